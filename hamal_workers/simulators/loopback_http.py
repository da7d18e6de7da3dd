"""The HTTP(S) server the simulators share: one thread per connection, TLS handshakes in the
connection's thread, keep-alive, and a stop that wakes idle connections."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol


class Handles(Protocol):
    def _handle(self, handler: Any) -> None: ...


class SimulatorHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], sim: Handles, handler: type[SimulatorRequestHandler]
    ) -> None:
        self.sim = sim
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def stop(self) -> None:
        """Stop serving (from another thread than serve_forever's) and close every connection."""
        self.shutdown()
        self.close_connections()
        self.server_close()

    def close_connections(self) -> None:
        """Wake the threads of idle keep-alive connections: they see the end of the stream."""
        with self._open_lock:
            open_sockets = list(self._open)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away, timed out or failed the TLS handshake
        super().handle_error(request, client_address)


class SimulatorRequestHandler(http.server.BaseHTTPRequestHandler):
    """Hands every request to the simulator's `_handle`; subclasses name the server."""

    server: SimulatorHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, as keystoneauth's and requests' sessions use it
    sys_version = ""
    timeout = 60  # an idle keep-alive connection is closed after this
    # Headers and body are two writes: without this, Nagle holds the body back for an ACK.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
        super().setup()

    def _any(self) -> None:
        self.server.sim._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class JsonResponse:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def send_json(
    handler: http.server.BaseHTTPRequestHandler,
    response: JsonResponse,
    content_type: str = "application/json",
) -> None:
    body = b"" if response.body is None else json.dumps(response.body).encode()
    try:
        handler.send_response(response.status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in response.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
    except (ConnectionError, TimeoutError, ssl.SSLError):
        handler.close_connection = True  # the client gave up
