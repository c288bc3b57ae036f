"""clouds.yaml entries so the stock `openstack` CLI and openstacksdk find the cloud."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from cloudland.config import Config

USER_CLOUDS_YAML = Path.home() / ".config" / "openstack" / "clouds.yaml"


def cloud_entries(config: Config, admin_password: str, demo_password: str) -> dict:
    auth_url = config.api.base_url() + "/identity"

    def entry(user: str, password: str, project: str) -> dict:
        return {
            "auth": {"auth_url": auth_url, "username": user, "password": password,
                     "project_name": project, "user_domain_name": "Default",
                     "project_domain_name": "Default"},
            "region_name": config.identity.region,
            "identity_api_version": 3,
            "interface": "public",
        }

    return {
        "cloudland": entry(config.identity.admin_user, admin_password, config.identity.admin_project),
        "cloudland-demo": entry(config.identity.demo_user, demo_password, config.identity.demo_project),
    }


def write_clouds_yaml(path: Path, entries: dict) -> None:
    """Merge ``entries`` into the clouds.yaml at ``path``, keeping other clouds; mode 0600."""
    data: dict = {}
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("clouds", {}).update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, path)
