"""`serve`'s options, declared once: the `scratchgpt serve` flags (cli.py builds them from ServeOptions), the
Python API (`create_app`, `serve`) and their checks. No FastAPI import here, so `--help` stays quick."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal, Optional

from .. import UserError
from ..checks import check_fields

MAX_NEW_TOKENS = 2**20  # generate.MAX_NEW_TOKENS (not imported: that would load torch for `serve --help`)

MAX_BODY_BYTES = 16 * 2**20  # a request body: far past any prompt a context holds
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SERVE_RANGES = {"port": "[0, 65535]", "max_tokens_limit": f"[1, {MAX_NEW_TOKENS}]", "max_queue": "[0, 1000000]",
                "request_timeout": "(0, 1e6]", "max_connections": "[1, 1000000]", "header_timeout": "(0, 1e6]",
                "body_timeout": "(0, 1e6]", "keep_alive_timeout": "(0, 1e6]", "max_header_bytes": "[1024, 1048576]",
                "template_timeout": "(0, 1e6]"}


@dataclass(frozen=True)
class ServeOptions:
    """How `scratchgpt serve` listens, whom it admits, and what bounds each request and connection."""

    host: str = "127.0.0.1"
    """Address to listen on; beyond loopback needs --api-key or --insecure."""
    port: int = 8000
    """TCP port."""
    device: str = "auto"
    """cpu, cuda, ...; auto: cuda > mps > cpu."""
    max_tokens_limit: int = 4096
    """Largest max_tokens a request may ask for."""
    api_key: Optional[str] = None
    """Require `Authorization: Bearer KEY` on every route but / and /health (default: $SCRATCHGPT_API_KEY; unset:
    no key). Printable ASCII without spaces, as HTTP clients can send it."""
    insecure: bool = False
    """Allow a --host beyond loopback without an API key."""
    max_queue: int = 16
    """Requests that may wait while one generates; more get 503 with Retry-After."""
    request_timeout: float = 300.0
    """Seconds a request may take, prompt building and waiting included: 503 while waiting, 504 once generating."""
    template_timeout: float = 10.0
    """Seconds a chat template may take to render one conversation (an imported model's jinja template runs in a
    worker process that is killed past this; within --request-timeout)."""
    max_connections: int = 128
    """Open connections at most; one more is answered 503 and closed at once."""
    header_timeout: float = 10.0
    """Seconds a client may take to send a request's headers (after connecting, or after its last response); then
    the connection is closed."""
    body_timeout: float = 60.0
    """Seconds a client may take to send a request body; then 408 and the connection is closed."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open between requests."""
    max_header_bytes: int = 16384
    """Largest request line and headers, in bytes (h11's incomplete-event limit); larger ones get 400."""
    utf8_guard: bool = True
    """Never sample a token whose bytes would break UTF-8 (byte-level tokenizers), as `sample` does: replies hold
    no U+FFFD from split characters. --no-utf8-guard samples every token."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn's log level."""

    def __post_init__(self) -> None:
        check_fields(self, lambda name: "--" + name.replace("_", "-"), SERVE_RANGES)
        if self.api_key is not None:
            check_api_key(self.api_key)


def check_api_key(key: str) -> None:
    """A key HTTP clients can send in a header: printable ASCII, no spaces (httpx and the openai client can't
    encode anything else, and a control character would end the header)."""
    bad = next((c for c in key if not "!" <= c <= "~"), None)
    if not key or bad is not None:
        what = "is empty" if not key else f"holds {bad!r}, which HTTP clients can't send in a header"
        raise UserError(f"--api-key (or SCRATCHGPT_API_KEY) {what}: use printable ASCII without spaces")


def resolve_api_key(options: ServeOptions) -> ServeOptions:
    """The options with the key from $SCRATCHGPT_API_KEY when --api-key is not given (an empty variable: none)."""
    from dataclasses import replace

    if options.api_key is not None:
        return options
    env = os.environ.get("SCRATCHGPT_API_KEY")
    return replace(options, api_key=env) if env else options


def check_serve_options(options: ServeOptions) -> None:
    """What the fields can't check alone, before the model loads: loopback without a key, and the port free."""
    if options.host not in LOOPBACK and not options.api_key and not options.insecure:
        raise UserError(f"--host {options.host} lets other machines in, and there is no API key: give --api-key KEY "
                        "(or SCRATCHGPT_API_KEY), or --insecure to serve without one")
    _check_bind(options.host, options.port)


def _check_bind(host: str, port: int) -> None:
    """Fail with one line now, rather than with uvicorn's log after loading the model."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does, so TIME_WAIT isn't "in use"
        try:
            sock.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror} (try another --port)") from None
