"""The "outside" host of the dev/test topology: plays the internet on the external network.

Runs inside the outside namespace (``nsenter --net=…``): answers HTTP on port 80 (IPv4 and
IPv6) with the
address the request came from (``cloudland-outside: you are <ip>``), so a guest behind SNAT
can see which address it left with. Ping is the kernel's.

    python -m cloudland.allinone.outside --port 80
"""

from __future__ import annotations

import argparse
import http.server
import socket


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        client = self.client_address[0].removeprefix("::ffff:")  # IPv4 on the dual-stack socket
        body = f"cloudland-outside: you are {client}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class DualStackServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args()
    DualStackServer(("::", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
