"""`scratchgpt serve RUN`: load the run once, then serve it with uvicorn, bounding what a client can hold.

uvicorn's h11 protocol, with the connection-level limits it lacks: at most --max-connections open (one more is
answered 503 and closed), a request's headers within --header-timeout of connecting or of the last response
(slow and half-open connections are closed), and its own malformed-request answers (a bad Content-Length, an
oversized header) in OpenAI's error shape rather than plain text.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Union

from .engine import Engine
from .guard import error_bytes
from .options import LOOPBACK, ServeOptions, check_serve_options, resolve_api_key


def serve(run: Union[str, Path], options: Optional[ServeOptions] = None, *, which: str = "best",
          quantize: Optional[str] = None) -> None:
    """Serve `run` until Ctrl-C or SIGTERM, which stop it gracefully: no new connections, requests in flight
    cancelled at their next token, exit 0."""
    import uvicorn

    from ..checkpoint import load_run
    from ..quantize import quantize_model
    from ..runtime import pick_device
    from .app import create_app

    options = resolve_api_key(options or ServeOptions())
    check_serve_options(options)
    loaded = load_run(run, which, device=pick_device(options.device))
    model, tokenizer, config = loaded.language_model("serve"), loaded.tokenizer, loaded.config
    quantize_model(model, quantize)
    run_path = Path(run).resolve()
    name = run_path.parent.name if run_path.name in ("best", "latest") else run_path.name
    app = create_app(model, tokenizer, config, name=name, options=options)
    host, port = options.host, options.port
    if host not in LOOPBACK and not options.api_key:
        print(f"warning: listening on {host} without an API key (--insecure): anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {name} at http://{host}:{port}/ (chat page; OpenAI-compatible API at /v1; "
          f"{'API key required' if options.api_key else 'no API key'}; Ctrl-C stops)", file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level=options.log_level, timeout_graceful_shutdown=5,
                            http=bounded_protocol(options), timeout_keep_alive=options.keep_alive_timeout,
                            h11_max_incomplete_event_size=options.max_header_bytes)
    _graceful_server(config, app.state.server).run()
    print("server stopped", file=sys.stderr)


def bounded_protocol(options: ServeOptions) -> type:
    """uvicorn's H11Protocol with --max-connections, --header-timeout and answers in OpenAI's error shape."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Bounded(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > options.max_connections:
                transport.write(error_bytes(503, f"too many connections (--max-connections "
                                                 f"{options.max_connections}); retry later"))
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(options.header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # nothing in flight: a slow or half-open client

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm()  # the next request's headers are due (a pipelined one disarms it at once)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self.transport.write(error_bytes(400, f"malformed HTTP request ({msg.rstrip('.')}): check the "
                                                  "request line, the headers and Content-Length"))
            self.transport.close()

    return Bounded


def _graceful_server(config, engine: Engine):
    """uvicorn's server, which on SIGTERM/SIGINT also stops the generations in flight (at their next token), and
    doesn't re-raise the signal after its graceful shutdown (that would end the process with the signal's status,
    not 0). Once it has stopped, the model's thread ends (after its job, if any): the command's exit then need not
    wait for Python's teardown to join it."""
    import uvicorn

    class Graceful(uvicorn.Server):
        def run(self, sockets=None) -> None:
            try:
                super().run(sockets)
            finally:
                engine.model_thread.shutdown(wait=True)

        def handle_exit(self, sig: int, frame) -> None:
            engine.stopping = True
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29 re-raises these on exit
            if isinstance(captured, list):
                captured.clear()

    return Graceful(config)
