"""The server's HTTP edge: what uvicorn does before the application sees a request. Every answer shaped here is
JSON like the application's; a client that sends its headers or body too slowly is answered 408 and closed, so
slow clients cannot hold the server's capacity (uvicorn alone has no header timeout, and its concurrency limit
counted such connections until every other request got a plain-text 503)."""

from __future__ import annotations

import errno
import json
import socket

from twotower_cli.errors import UsageError

MAX_CONNECTIONS = 2048  # open connections; past it the longest idle one is closed, or (none idle) the new one gets 503


def error_bytes(status: int, reason: str, error: str) -> bytes:
    body = json.dumps({"error": error}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def guarded_protocol(header_timeout: float = 10.0, body_timeout: float = 30.0,
                     max_connections: int = MAX_CONNECTIONS):
    """uvicorn's h11 protocol with deadlines (``header_timeout`` seconds from a connection, or from the previous
    response, to the end of a request's headers; ``body_timeout`` more for its body, and for a response the client
    stopped reading), a connection cap and JSON for the errors it answers itself."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        phase, deadline, stalled, since = "headers", None, None, 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.since = self.loop.time()
            if len(self.connections) > max_connections and not self.close_longest_idle():
                self.refuse(503, "Service Unavailable", "the server has too many open connections; retry")
                return
            self.arm(header_timeout)

        def idle(self) -> bool:
            """No request at the application: between requests, or still sending one (a new client is worth
            more than a connection that waits, or one that sends its headers slowly)."""
            return self.cycle is None or self.cycle.response_complete

        def close_longest_idle(self) -> bool:
            idle = [c for c in self.connections if c is not self and isinstance(c, Guarded) and c.idle()
                    and not c.transport.is_closing()]
            if not idle:
                return False
            min(idle, key=lambda c: c.since).transport.close()
            return True

        def arm(self, seconds: float) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(seconds, self.too_slow)

        def too_slow(self) -> None:
            """The request that was due: none begun (an idle connection: closed), its headers or its body
            unfinished (408), or all in (the application is answering: nothing to do)."""
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                if not cycle.more_body:
                    return
                if self.phase == "headers":
                    self.phase = "body"
                    self.arm(body_timeout)
                    return
                self.refuse(408, "Request Timeout", f"the request body did not arrive within {body_timeout:g} s")
            elif self.conn.trailing_data[0]:
                self.refuse(408, "Request Timeout", f"the request headers did not arrive within {header_timeout:g} s")
            else:
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.phase, self.since = "headers", self.loop.time()
            if not self.transport.is_closing():
                self.arm(self.timeout_keep_alive + header_timeout)

        def pause_writing(self) -> None:  # a client that stops reading its response is cut off, not waited on
            super().pause_writing()
            if self.stalled is None:
                self.stalled = self.loop.call_later(body_timeout, self.transport.abort)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.stalled is not None:
                self.stalled.cancel()
                self.stalled = None

        def connection_lost(self, exc) -> None:
            for timer in (self.deadline, self.stalled):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self.refuse(400, "Bad Request", "not a valid HTTP/1.1 request (its request line or a header, such as "
                                            "Content-Length, cannot be read)")

        def refuse(self, status: int, reason: str, error: str) -> None:
            self.transport.write(error_bytes(status, reason, error))
            self.transport.close()

    return Guarded


class TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before the app parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await json_response(send, 413, f"request body over {self.limit:,} bytes")
        received, started, over = 0, False, False

        async def limited():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # a chunked body has no length to check up front
                    over = True
                    raise TooLarge
            return message

        async def watch(message):
            nonlocal started
            if over:  # the app answered a body it could not finish reading (FastAPI: a 400): say why instead
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await json_response(send, 413, f"request body over {self.limit:,} bytes")
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watch)
        except TooLarge:
            if not started:
                await json_response(send, 413, f"request body over {self.limit:,} bytes")


async def json_response(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening; a port in use is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit this (Linux): without it a keep-alive client waits for the delayed ACK of the
    # response's first segment, 40 ms on every request after the first
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        in_use = getattr(exc, "errno", None) == errno.EADDRINUSE or isinstance(exc, PermissionError)
        fix = "choose another --port" if in_use else f"check --host ({host!r} is not an address of this machine)"
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); {fix}") from None
    sock.listen(1024)
    return sock
