"""A fault-injecting S3 proxy on loopback, for tests: it sits in front of a real ``moto_server`` and
answers some object reads itself, the way a throttled or misconfigured S3 would.

- ``slowdown``: the fraction of object GETs (reads of a key, not listings) answered with
  ``503 SlowDown`` instead of being forwarded.  The draws come from a seeded RNG.
- ``denied``: keys (``bucket/key``) whose GET and HEAD always get ``403 AccessDenied``; they
  still show up in listings, like an object whose ACL forbids reading it.

Everything else is forwarded unchanged.  ``faults`` counts the answers the proxy made up, per kind.
"""

from __future__ import annotations

import http.client
import random
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><Resource>/{key}</Resource>"
    "<RequestId>catdog-s3proxy</RequestId></Error>"
)
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "expect",  # this server already answered "100 Continue" to the client
}


class FaultyS3Proxy:
    """``with FaultyS3Proxy(upstream_port, slowdown=0.2) as proxy: ... proxy.endpoint ...``"""

    def __init__(self, upstream_port: int, slowdown: float = 0.0, denied: set[str] | None = None, seed: int = 0):
        self.upstream_port = upstream_port
        self.slowdown = slowdown
        self.denied = set(denied or ())
        self.faults: Counter = Counter()
        self.object_gets = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3proxy", daemon=True)

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def fault_for(self, method: str, path: str) -> tuple[int, str, str] | None:
        """(status, code, message) when this request gets a made-up answer, else None."""
        parsed = urllib.parse.urlsplit(path)
        key = urllib.parse.unquote(parsed.path).lstrip("/")
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        is_object = "/" in key and not key.endswith("/") and not ({"list-type", "uploads", "uploadId"} & set(query))
        if not is_object or method not in ("GET", "HEAD"):
            return None
        with self._lock:
            if key in self.denied:
                self.faults["403 AccessDenied"] += 1
                return 403, "AccessDenied", "Access Denied"
            if method == "GET":
                self.object_gets += 1
                if self._rng.random() < self.slowdown:
                    self.faults["503 SlowDown"] += 1
                    return 503, "SlowDown", "Please reduce your request rate."
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the tests read the counters instead
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()  # the CRLF after each chunk
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields, up to the blank line that ends the body
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                length = str(len(body))
                for name, value in headers:
                    if name.lower() == "content-length" and self.command == "HEAD":
                        length = value  # the object's size, which HEAD reports without a body
                    elif name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.fault_for(self.command, self.path)
                if fault is not None:
                    status, code, message = fault
                    key = urllib.parse.urlsplit(self.path).path.lstrip("/")
                    xml = _ERROR_XML.format(code=code, message=message, key=key).encode()
                    self._answer(status, [("Content-Type", "application/xml")], xml)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self._answer(response.status, response.getheaders(), data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
