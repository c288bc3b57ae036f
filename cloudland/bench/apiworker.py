"""One API worker process for the benchmark; several share the port through SO_REUSEPORT.

``python -m cloudland.bench.apiworker CONFIG PORT`` (uvloop + httptools, access log off).
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path


def serve(config_path: Path, port: int) -> None:
    import uvicorn

    from cloudland.api.app import create_app
    from cloudland.config import load_config

    logging.basicConfig(level=logging.WARNING)
    config = load_config(config_path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(create_app(config), loop="uvloop", http="httptools",
                                           log_level="warning", access_log=False, lifespan="on",
                                           backlog=4096))
    server.run(sockets=[sock])


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
