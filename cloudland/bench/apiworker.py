"""One API worker process for the benchmark; several share the port through SO_REUSEPORT.

``python -m cloudland.bench.apiworker CONFIG PORT`` (uvloop + httptools, access log off).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn


class _Server(uvicorn.Server):
    """Returns from ``run()`` on SIGTERM instead of re-raising it (so cProfile can write)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


def serve(config_path: Path, port: int) -> None:
    from cloudland.api.app import create_app
    from cloudland.config import load_config

    logging.basicConfig(level=logging.WARNING)
    config = load_config(config_path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    server = _Server(uvicorn.Config(create_app(config, tune_gc=True), loop="uvloop", http="httptools",
                                           log_level="warning", access_log=False, lifespan="on",
                                           backlog=4096))
    server.run(sockets=[sock])


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
