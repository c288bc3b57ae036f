"""The "outside" host of the dev/test topology: plays the internet on the external network.

Runs inside the outside namespace (``nsenter --net=…``): answers HTTP on port 80 with the
address the request came from (``cloudland-outside: you are <ip>``), so a guest behind SNAT
can see which address it left with. Ping is the kernel's.

    python -m cloudland.allinone.outside --port 80
"""

from __future__ import annotations

import argparse
import http.server


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"cloudland-outside: you are {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args()
    http.server.ThreadingHTTPServer(("0.0.0.0", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
