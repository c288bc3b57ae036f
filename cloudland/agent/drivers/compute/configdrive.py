"""The config drive: an ISO 9660 image (Joliet + Rock Ridge) labelled ``config-2``, as Nova
writes it, built with pycdlib from the InstanceSpec (no external tools)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pycdlib

from cloudland.bus.messages import InstanceSpec
from cloudland.metadata import content

LABEL = "config-2"


def files(spec: InstanceSpec) -> dict[str, bytes]:
    """Path on the drive -> content."""
    out = {
        "openstack/latest/meta_data.json": json.dumps(content.meta_data(spec)).encode(),
        "openstack/latest/network_data.json": json.dumps(content.network_data(spec)).encode(),
        "openstack/latest/vendor_data.json": b"{}",
        "openstack/latest/vendor_data2.json": b"{}",
    }
    data = content.user_data(spec)
    if data is not None:
        out["openstack/latest/user_data"] = data
    return out


def _iso_name(part: str, is_dir: bool) -> str:
    """The ISO 9660 (level 3, d-characters) name; Rock Ridge and Joliet carry the real one."""
    stem, _, ext = part.rpartition(".") if "." in part and not is_dir else (part, "", "")

    def clean(s: str) -> str:
        return "".join(c if c.isalnum() else "_" for c in s.upper())

    if is_dir:
        return clean(part)[:30]
    return f"{clean(stem)[:25]}.{clean(ext)[:3]};1"


def build_iso(spec: InstanceSpec) -> bytes:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    made: set[str] = set()
    for path, data in sorted(files(spec).items()):
        parts = path.split("/")
        iso_dir = ""
        for i, part in enumerate(parts[:-1]):
            iso_dir += "/" + _iso_name(part, True)
            real = "/" + "/".join(parts[: i + 1])
            if real not in made:
                iso.add_directory(iso_dir, rr_name=part, joliet_path=real)
                made.add(real)
        iso.add_fp(io.BytesIO(data), len(data), f"{iso_dir}/{_iso_name(parts[-1], False)}",
                   rr_name=parts[-1], joliet_path="/" + path)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def write_iso(spec: InstanceSpec, path: Path) -> None:
    """Write the drive atomically (rebuilt on each prepare: the content follows the spec)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(build_iso(spec))
    os.replace(tmp, path)
