"""Endpoints for Cloudland's own components (agents), not part of any OpenStack API."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse

from cloudland.api.errors import forbidden, not_found
from cloudland.api.image.routes import file_response
from cloudland.api.image.store import ImageStore
from cloudland.config import Config
from cloudland.db.models import Image
from cloudland.secrets import UrlSigner, url_signer

router = APIRouter(prefix="/internal", include_in_schema=False)


def _resource(image_id: str) -> str:
    return f"image:{image_id}"


@lru_cache(maxsize=8)
def _signer(keys_dir: Path) -> UrlSigner:
    # The controller signs a URL per image per spec: read the key file once.
    return url_signer(keys_dir)


def image_download_url(config: Config, image_id: str, ttl: float = 3600) -> str:
    """A signed URL an agent can fetch the image data from, without a token, for ``ttl`` seconds."""
    expires, signature = _signer(config.keys_dir).sign(_resource(image_id), ttl)
    query = urlencode({"expires": expires, "signature": signature})
    return f"{config.api.agent_url()}/internal/images/{image_id}/data?{query}"


async def setup(app: FastAPI, config: Config) -> None:
    app.state.url_signer = _signer(config.keys_dir)


@router.get("/images/{image_id}/data", response_model=None)
async def image_data(image_id: str, request: Request, expires: str = "", signature: str = "") -> FileResponse:
    signer: UrlSigner = request.app.state.url_signer
    try:
        valid = signer.verify(_resource(image_id), int(expires), signature)
    except (ValueError, TypeError):  # not an integer / non-ASCII signature
        valid = False
    if not valid:
        raise forbidden("The signature is invalid or has expired.")
    config: Config = request.app.state.config
    store = ImageStore(config.images_dir)
    async with request.app.state.sessionmaker() as db:
        image = await db.get(Image, image_id)
    if image is None or image.deleted or image.status != "active" or not await store.exists(image_id):
        raise not_found(f"Image {image_id} has no data.")
    return file_response(store, image)
