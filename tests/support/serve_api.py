"""Run the API alone over real HTTP for tests and benchmarks: migrate, bootstrap, serve.

    python -m tests.support.serve_api STATE_DIR PORT

Prints one line of JSON (admin/demo passwords) when bootstrapped; serves until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import uvicorn

from cloudland.api.app import create_app
from cloudland.config import Config


async def main(state_dir: Path, port: int) -> None:
    from cloudland.allinone.bootstrap import bootstrap_cloud

    config = Config(state_dir=state_dir)
    config.api.listen_port = port
    result = await bootstrap_cloud(config, guest_image=None, user_clouds_yaml=False)
    print(json.dumps({"admin_password": result.admin_password, "demo_password": result.demo_password}),
          flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(config, connect_bus=False), host="127.0.0.1",
                                           port=port, log_level="warning", access_log=False))
    await server.serve()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
