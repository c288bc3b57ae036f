"""Helpers every Nova resource shares: microversions, links, timestamps."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import urlencode

from fastapi import Request

from cloudland.api.errors import bad_request


class Microversion(NamedTuple):
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @classmethod
    def parse(cls, text: str) -> Microversion:
        """``"2.47"`` → (2, 47); raises 400 for anything else (Nova's InvalidAPIVersionString)."""
        match = re.fullmatch(r"\s*([1-9]\d*)\.(0|[1-9]\d*)\s*", text)
        if not match:
            raise bad_request(f"API Version String {text} is of invalid format. Must be of format "
                              "MajorNum.MinorNum.")
        return cls(int(match.group(1)), int(match.group(2)))


MIN_VERSION = Microversion(2, 1)
# Raise only when every resource renders correctly at every version up to it.
MAX_VERSION = Microversion(2, 1)
# When the v2.1 API was released; Nova reports this same date.
VERSION_UPDATED = "2013-07-23T11:33:21Z"


def microversion(request: Request) -> Microversion:
    """The microversion the request asked for (the middleware in versions.py sets it)."""
    return getattr(request.state, "microversion", MIN_VERSION)


def at_least(request: Request, version: str) -> bool:
    """True when the request's microversion is ``version`` or later, e.g. ``at_least(req, "2.47")``."""
    return microversion(request) >= Microversion.parse(version)


def base_url(request: Request) -> str:
    """The public root URL (config ``api.public_url``, else the URL the client used)."""
    public = request.app.state.config.api.public_url.rstrip("/")
    return public or str(request.base_url).rstrip("/")


def compute_url(request: Request) -> str:
    return f"{base_url(request)}/compute"


def links(request: Request, collection: str, resource_id: str) -> list[dict[str, str]]:
    """Nova's ``links``: a versioned self link and an unversioned bookmark."""
    root = compute_url(request)
    return [
        {"rel": "self", "href": f"{root}/v2.1/{collection}/{resource_id}"},
        {"rel": "bookmark", "href": f"{root}/{collection}/{resource_id}"},
    ]


def next_link(request: Request, collection: str, marker: str, **params: Any) -> dict[str, str]:
    """A ``<collection>_links`` entry for the next page, keeping the request's other parameters."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "marker"]
    query += [(k, str(v)) for k, v in params.items()]
    query.append(("marker", marker))
    return {"rel": "next", "href": f"{compute_url(request)}/v2.1/{collection}?{urlencode(query)}"}


def isotime(value: datetime | None) -> str | None:
    """Nova's ``created``/``updated`` style: RFC 3339 with ``Z``, whole seconds."""
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def naive_time(value: datetime | None) -> str | None:
    """Nova's DB-field style (keypair ``created_at``, ``launched_at``): no zone, microseconds."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f") if value else None


def parse_int(value: str | None, name: str, *, minimum: int = 0) -> int | None:
    """A non-negative integer query parameter, 400 otherwise."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise bad_request(f"Invalid {name} value: {value!r}; it must be an integer.") from None
    if number < minimum:
        raise bad_request(f"Invalid {name} value: {value}; it must be at least {minimum}.")
    return number


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "t", "true", "on", "y", "yes"):
        return True
    if lowered in ("0", "f", "false", "off", "n", "no"):
        return False
    raise bad_request(f"Invalid value '{value}' for {name}: it must be a boolean.")
