"""First start of a cloud: migrate the database and create what a new user needs.

Everything here is idempotent: a second ``cloudland up`` finds the state and carries on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cloudland.allinone.clouds_yaml import USER_CLOUDS_YAML, cloud_entries, write_clouds_yaml
from cloudland.config import Config
from cloudland.db.engine import make_engine, make_sessionmaker
from cloudland.db.migrate import upgrade_async

GUEST_IMAGE_NAME = "cloudland-guest"


@dataclass
class BootstrapResult:
    admin_password: str
    demo_password: str
    demo_project_id: str
    demo_network_id: str
    guest_image_id: str | None
    clouds_yaml: list[Path]


async def bootstrap_cloud(config: Config, *, guest_image: Path | None, user_clouds_yaml: bool,
                          external: ipaddress.IPv4Interface | None = None,
                          external6: ipaddress.IPv6Interface | None = None) -> BootstrapResult:
    """``external``: the outside host's address of a dev/test topology; the admin's external
    network ``public`` gets that subnet with it as gateway."""
    from cloudland.api.compute.flavors import bootstrap_flavors
    from cloudland.api.identity.bootstrap import bootstrap_identity
    from cloudland.api.image import bootstrap_image
    from cloudland.api.network.bootstrap import bootstrap_demo_network, bootstrap_public_network

    config.state_dir.mkdir(parents=True, exist_ok=True)
    await upgrade_async(config.database_url)
    engine = make_engine(config.database_url)
    sessionmaker = make_sessionmaker(engine)
    try:
        creds = await bootstrap_identity(sessionmaker, config)
        await bootstrap_flavors(sessionmaker)
        image_id = None
        if guest_image is not None:
            image_id = await bootstrap_image(sessionmaker, config, GUEST_IMAGE_NAME, guest_image, "qcow2")
        network_id = await bootstrap_demo_network(sessionmaker, creds.demo_project_id)
        if external is not None:
            await bootstrap_public_network(sessionmaker, external, external6)
    finally:
        await engine.dispose()

    entries = cloud_entries(config, creds.admin_password, creds.demo_password)
    paths = [config.state_dir / "clouds.yaml"]
    if user_clouds_yaml:
        paths.append(USER_CLOUDS_YAML)
    for path in paths:
        write_clouds_yaml(path, entries)
    return BootstrapResult(creds.admin_password, creds.demo_password, creds.demo_project_id,
                           network_id, image_id, paths)
