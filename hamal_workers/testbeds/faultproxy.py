"""An HTTP proxy that tests put between the proxy and a server to make the network fail.

    proxy = FaultProxy("http://127.0.0.1:9000").start()      # listens on 127.0.0.1:<port>
    proxy.fail(503, count=3, method="PUT", path=r"/bucket/chunks/")   # answers instead
    proxy.drop(count=2)                    # closes the connection without an answer
    proxy.delay(2.0, count=1)              # holds the answer back that long
    proxy.down()  ...  proxy.up()          # every request refused until up() (503)

Requests are relayed unchanged (headers too: a signed request stays valid) and answers
relayed back; each fault applies to the next `count` requests that match its method and
path pattern. `calls` records (method, path, what happened) for the tests to read.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}  # fmt: skip
_S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    429: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Fault:
    kind: str  # "status", "drop", "delay"
    count: int  # how many matching requests it still applies to; -1 = until cleared
    method: str
    path: re.Pattern[str]
    status: int = 503
    seconds: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return self.count != 0 and method.startswith(self.method) and bool(self.path.search(path))


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.calls: list[tuple[str, str, str]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Relay):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy",
                         daemon=True).start()  # fmt: skip
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- faults --------------------------------------------------------------------------
    def _add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def fail(self, status: int = 503, count: int = 1, method: str = "", path: str = "") -> None:
        self._add(Fault("status", count, method, re.compile(path), status=status))

    def drop(self, count: int = 1, method: str = "", path: str = "") -> None:
        self._add(Fault("drop", count, method, re.compile(path)))

    def delay(self, seconds: float, count: int = 1, method: str = "", path: str = "") -> None:
        self._add(Fault("delay", count, method, re.compile(path), seconds=seconds))

    def down(self) -> None:
        self._add(Fault("status", -1, "", re.compile(""), status=503))

    def up(self) -> None:
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.count > 0:
                        fault.count -= 1
                    return fault
        return None

    def record(self, method: str, path: str, what: str) -> None:
        with self._lock:
            self.calls.append((method, path, what))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Relay(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def _relay(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = owner.take(self.command, self.path)
        if fault is not None and fault.kind == "drop":
            owner.record(self.command, self.path, "dropped")
            self.close_connection = True
            self.connection.close()
            return
        if fault is not None and fault.kind == "status":
            owner.record(self.command, self.path, str(fault.status))
            code, message = _S3_ERRORS.get(fault.status, ("ServiceUnavailable", "Injected."))
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>{message}</Message></Error>").encode()  # fmt: skip
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)  # the fault itself: an answer that is late
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream = http.client.HTTPConnection(*owner.upstream, timeout=300)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        owner.record(self.command, self.path, "delayed" if fault else str(answer.status))
        self.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay
