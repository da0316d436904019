"""An HTTP proxy in front of the S3 server that fails a share of requests the way S3
does under load: 503 SlowDown (throttling), 500 InternalError, and connections dropped
before any response. Everything else is forwarded unchanged.

It also records, per fault kind, how many failed requests were later sent again and
answered (``recovered``), so a test can tell "retried" from "lost"; and it can answer
the first few writes to chosen paths with a burst of 500s, long enough to outlast
botocore's default retries (5 attempts) but not bft's (10)."""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERRORS = {
    "throttle": (503, "SlowDown", "Please reduce your request rate."),
    "server_error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up mid-answer (after a dropped connection) are expected


class S3FaultProxy:
    """``fault_rate``: share of requests failed at random (seeded); ``deny``: a path
    prefix (``/bucket/key-prefix``) every request to which gets 403 AccessDenied;
    ``bursts``: how many writes (PUT) to a path containing one of ``burst_on`` get
    ``burst_length`` 500s in a row (the first ones to arrive)."""

    def __init__(self, upstream: str, fault_rate: float = 0.15, seed: int = 7, deny: str | None = None,
                 bursts: int = 0, burst_length: int = 5, burst_on: tuple[str, ...] = ("",)):
        self.upstream = urlsplit(upstream)
        self.deny = deny
        self.fault_rate = fault_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.recovered: Counter[str] = Counter()  # failed requests answered on a later try
        self.pending: dict[tuple, str] = {}  # failed requests not (yet) answered: key -> kind
        self.bursts_left = bursts
        self.burst_on = burst_on
        self.burst_length = burst_length
        self.burst: dict[tuple, int] = {}  # key -> 500s still to answer in a row
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> S3FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def unrecovered(self) -> dict[tuple, str]:
        """Failed requests never answered on a later try: lost, not retried."""
        with self.lock:
            return dict(self.pending)

    def _pick(self, key: tuple) -> str:
        method, path, _ = key
        with self.lock:
            self.counts["requests"] += 1
            # ListObjects names its prefix in the query string, other calls in the path.
            if self.deny and (path.startswith(self.deny) or self._lists_denied(path)):
                self.counts["denied"] += 1
                return "denied"
            if self.burst.get(key):
                self.burst[key] -= 1
                fault = "server_error"
            elif method == "PUT" and self.bursts_left and key not in self.burst and \
                    any(part in path for part in self.burst_on):
                fault = "server_error"
                self.bursts_left -= 1
                self.burst[key] = self.burst_length - 1
                self.counts["burst"] += 1
            elif self.random.random() >= self.fault_rate:
                return "forward"
            else:
                fault = self.random.choice(["throttle", "server_error", "drop"])
            self.counts[fault] += 1
            self.pending[key] = fault
            return fault

    def _answered(self, key: tuple, status: int) -> None:
        with self.lock:
            if status < 500 and key in self.pending:
                self.recovered[self.pending.pop(key)] += 1


    def _lists_denied(self, path: str) -> bool:
        bucket, _, rest = self.deny.lstrip("/").partition("/")
        parts = urlsplit(path)
        return parts.path.rstrip("/") == f"/{bucket}" and f"prefix={rest}" in parts.query.replace("%2F", "/")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                # A retry repeats method, path (with its query) and byte range.
                key = (self.command, self.path, self.headers.get("Range"))
                action = proxy._pick(key)
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if action in _ERRORS:
                    status, code, message = _ERRORS[action]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                proxy._answered(key, resp.status)
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                # HEAD answers carry the object's size, not the (empty) body's.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler
