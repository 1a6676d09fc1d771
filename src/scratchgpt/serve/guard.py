"""What stands in front of every route: the API key and the request body's limits (ASGI middleware), answered
in OpenAI's error shape.

The body cap counts the bytes actually received, `Transfer-Encoding: chunked` included: the body is read here,
chunk by chunk, and refused with 413 as soon as it passes the cap (so at most the cap is ever held, and given
back to the system after), or with 408 when it takes longer than the body timeout; the route then gets the body
from memory.
"""

from __future__ import annotations

import asyncio
import mmap
import secrets
from typing import Optional

from starlette.responses import JSONResponse

OPEN_PATHS = ("/health", "/")  # the liveness probe and the chat page (which asks for the key itself)


def error_response(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                   code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response in OpenAI's error shape, for answers written below ASGI (connection level)."""
    import json

    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "server_error", "param": None, "code": None}}).encode()
    reason = {400: "Bad Request", 503: "Service Unavailable"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class Guard:
    """ASGI middleware: the API key (on every route but OPEN_PATHS, as vLLM and OpenAI's API check it) and the
    request body (at most `max_body` bytes, within `body_timeout` seconds)."""

    def __init__(self, app, api_key: Optional[str], max_body: int, body_timeout: float):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body, self.body_timeout = max_body, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._check_headers(scope)
        if refusal is None:
            body, refusal = await self._read_body(receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, scope) -> Optional[JSONResponse]:
        auth = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(auth) > 1:  # which one counts would depend on the parser: none does
            return error_response(400, "send one Authorization header, not several", code="invalid_api_key")
        if self.expected is not None and scope["path"] not in OPEN_PATHS and \
                not secrets.compare_digest(auth[0] if auth else b"", self.expected):
            return error_response(401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        lengths = [v for k, v in scope["headers"] if k == b"content-length"]
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return error_response(400, "malformed Content-Length header", headers={"Connection": "close"})
        if lengths and int(lengths[0]) > self.max_body:
            return self._too_large()
        return None

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"the request body is larger than {self.max_body} bytes",
                              headers={"Connection": "close"})

    async def _read_body(self, receive) -> tuple[bytes, Optional[JSONResponse]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        body = _Body(self.max_body)
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    return b"", error_response(408, f"the request body took longer than {self.body_timeout:g} s to "
                                                    "arrive", headers={"Connection": "close"})
                if message["type"] == "http.disconnect":
                    return b"", error_response(400, "the client went away before its body arrived")
                if not body.add(message.get("body", b"")):
                    return b"", self._too_large()
                if not message.get("more_body", False):
                    return body.value(), None
        finally:
            body.close()


class _Body:
    """A request body as it arrives, at most `cap` bytes. Past 1 MiB it moves to an anonymous memory map: only
    the pages written count, and all of them go back to the system at once when the request is done (a heap
    would keep them, fragmented)."""

    SPILL = 2**20

    def __init__(self, cap: int):
        self.cap, self.size = cap, 0
        self.chunks: list[bytes] = []
        self.map: Optional[mmap.mmap] = None

    def add(self, chunk: bytes) -> bool:
        """Keep `chunk`; False once the body passes the cap (nothing more is kept)."""
        if self.size + len(chunk) > self.cap:
            return False
        if self.map is None and self.size + len(chunk) > self.SPILL:
            self.map = mmap.mmap(-1, self.cap)
            for c in self.chunks:
                self.map.write(c)
            self.chunks.clear()
        if self.map is not None:
            self.map.write(chunk)
        else:
            self.chunks.append(chunk)
        self.size += len(chunk)
        return True

    def value(self) -> bytes:
        return self.map[: self.size] if self.map is not None else b"".join(self.chunks)

    def close(self) -> None:
        self.chunks.clear()
        if self.map is not None:
            self.map.close()


def _replay(body: bytes, receive):
    """The ASGI receive of a request whose body was read already: the body once, then the real receive (which
    reports the client's disconnect)."""
    pending = [body]

    async def replay():
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replay
