"""An OpenAI-compatible HTTP server for a trained run (`scratchgpt serve`), on FastAPI + uvicorn.

    GET  /health                 {"status": "ok", "model": NAME}
    GET  /v1/models              the one model served (its id is the run directory's name)
    POST /v1/completions         {"prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                                  "n", "echo", "stream", "repetition_penalty"}
    POST /v1/chat/completions    {"messages": [{"role", "content"}], ...the same options}

Request and response shapes follow OpenAI's API, so its clients work (point them at
http://HOST:PORT/v1). `top_k` and `repetition_penalty` are extensions (as in vLLM); `model`
is accepted and ignored, since one model is served. Options this server can't honour
(logprobs, frequency/presence penalties, logit_bias, best_of > 1, suffix) are refused
with a 400 rather than silently ignored. `stream: true` answers with server-sent events
(`data: {chunk}` lines, then `data: [DONE]`).

Chat prompts use the checkpoint's chat template when it has one (written by `finetune sft`),
laid out exactly as SFT trained on them; without one, messages are joined as lines of plain
text, as `scratchgpt chat` does. Turns that don't fit the context are dropped oldest first.

The model is loaded once. Generation is CPU-bound and not batched across requests, so
requests take turns behind an asyncio lock; they wait there without holding a worker thread.
There is no authentication: by default the server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import UserError
from .generate import Completion, GenerationConfig, complete, stream
from .prompts import ChatTemplate, encode_conversation

_GEN = GenerationConfig()  # the defaults shared with `sample`, `chat` and the Python API

DEFAULT_MAX_TOKENS_LIMIT = 4096
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Options(BaseModel):
    """Sampling options shared by both endpoints; unknown fields (e.g. `user`) are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(_GEN.temperature, ge=0)
    top_p: float = Field(_GEN.top_p, gt=0, le=1)
    top_k: Optional[int] = Field(_GEN.top_k, ge=0)
    repetition_penalty: float = Field(_GEN.repetition_penalty, gt=0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # OpenAI options this server can't honour: accepted at their neutral values only
    logprobs: Any = None
    top_logprobs: Any = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        bad = [name for name, neutral in (("logprobs", (None, False, 0)), ("top_logprobs", (None, 0)),
                                          ("frequency_penalty", (None, 0)), ("presence_penalty", (None, 0)),
                                          ("best_of", (None, 1)))
               if getattr(self, name) not in neutral]
        if self.logit_bias:
            bad.append("logit_bias")
        if bad:
            raise ValueError(f"{', '.join(bad)}: not supported by this server (repetition_penalty is)")
        if self.stream and self.n > 1:
            raise ValueError("stream supports n=1 only")
        return self


class CompletionRequest(_Options):
    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: give a string or a non-empty list of strings")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise ValueError("stream supports a single prompt only")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Options):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)  # OpenAI's newer name for max_tokens

    @model_validator(mode="after")
    def _check(self):
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be the user's (the server writes the reply)")
        seen_other = False
        for m in self.messages:
            if m.role in ("system", "developer") and seen_other:
                raise ValueError("messages: system messages must come before the conversation")
            seen_other = seen_other or m.role not in ("system", "developer")
        return self


# ---------------------------------------------------------------- responses
def _error(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Server:
    """The loaded model and what every request needs from it."""

    def __init__(self, model, tokenizer, config: dict, name: str, max_tokens_limit: int):
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        self.max_tokens_limit = max_tokens_limit
        self.template = ChatTemplate.from_config(config)  # a malformed template fails at startup, not per request
        self.created = int(time.time())
        self.lock = asyncio.Lock()

    def gen_config(self, req: _Options, max_tokens: Optional[int], default: int, extra_stop: tuple = ()) -> GenerationConfig:
        max_tokens = default if max_tokens is None else max_tokens
        if max_tokens > self.max_tokens_limit:
            raise UserError(f"max_tokens must be at most {self.max_tokens_limit}, got {max_tokens}")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stop += [s for s in extra_stop if s not in stop]
        return GenerationConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k or None,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, stop=tuple(stop),
                                seed=req.seed if req.seed is not None else secrets.randbits(62))

    def chat_prompt(self, messages: list[ChatMessage], reserve: int) -> list[int]:
        """Token ids of the conversation, ending where the assistant's reply begins."""
        system = [m.text() for m in messages if m.role in ("system", "developer")]
        turns = [(m.role, m.text()) for m in messages if m.role not in ("system", "developer")]
        budget = self.model.cfg.block_size - reserve
        while True:
            ids = self._encode_chat(system, turns)
            if len(ids) <= budget or len(turns) == 1:
                return ids  # still too long: generation keeps the last block_size tokens
            # drop the oldest exchange whole, so the history still starts with a user message
            turns = turns[1:]
            while len(turns) > 1 and turns[0][0] != "user":
                turns = turns[1:]

    def _encode_chat(self, system: list[str], turns: list[tuple[str, str]]) -> list[int]:
        tok = self.tokenizer
        if self.template is not None:  # the layout SFT trained on, token for token
            ids, _ = encode_conversation(tok, self.config["chat_template"], [("system", s) for s in system] + turns)
            return ids
        # no template: one running text, a line per message, as `scratchgpt chat` continues it
        lines = system + [text for _, text in turns]
        return tok.encode("".join(t if t.endswith("\n") else t + "\n" for t in lines))


def create_app(model, tokenizer, config: dict, *, name: str = "scratchgpt",
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> FastAPI:
    """The FastAPI app serving one loaded model (in eval mode) with its tokenizer and config dict."""
    srv = _Server(model, tokenizer, config, name, max_tokens_limit)
    app = FastAPI(title="scratchgpt", version="1", docs_url="/docs", redoc_url=None)
    app.state.server = srv

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # 400 with OpenAI's error shape and the field named, not FastAPI's default 422 list
        msgs, param = [], None
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                return _error(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            param = param or loc or None
            text = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
            msgs.append(f"{loc}: {text}" if loc and not text.startswith(loc) else text)
        return _error(400, "; ".join(msgs) or "invalid request", param)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": srv.name}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "scratchgpt"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        gen = srv.gen_config(req, req.max_tokens, default=min(_GEN.max_new_tokens, srv.max_tokens_limit))
        ids = [tokenizer.encode(p) for p in prompts]  # unknown characters: a 400 now, not mid-generation
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(text: str, finish: Optional[str]) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": srv.name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        if req.stream:
            s = stream(model, tokenizer, ids[0], gen)
            head = [chunk(prompts[0], None)] if req.echo and prompts[0] else []
            return _stream_response(srv, s, head, lambda piece: chunk(piece, None),
                                    lambda: chunk("", s.finish_reason), _usage_chunk(req, s, chunk("", None)))
        rows = [p for p in ids for _ in range(req.n)]
        async with srv.lock:
            results: list[Completion] = await run_in_threadpool(complete, model, tokenizer, rows, gen)
        choices = [{"index": i, "text": (prompts[i // req.n] if req.echo else "") + c.text,
                    "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(results)]
        usage = _usage(sum(c.prompt_tokens for c in results[::req.n]), sum(len(c.token_ids) for c in results))
        return {"id": rid, "object": "text_completion", "created": created, "model": srv.name, "choices": choices,
                "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        gen = srv.gen_config(req, max_tokens, default=min(_GEN.max_new_tokens, srv.max_tokens_limit),
                             extra_stop=tuple(srv.template.stop) if srv.template else ())
        reserve = min(max(gen.max_new_tokens, 1), model.cfg.block_size // 2)  # room for the reply, as `chat` leaves
        ids = srv.chat_prompt(req.messages, reserve)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(delta: dict, finish: Optional[str]) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": srv.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        if req.stream:
            s = stream(model, tokenizer, ids, gen)
            return _stream_response(srv, s, [chunk({"role": "assistant", "content": ""}, None)],
                                    lambda piece: chunk({"content": piece}, None),
                                    lambda: chunk({}, s.finish_reason), _usage_chunk(req, s, chunk({}, None)))
        async with srv.lock:
            results: list[Completion] = await run_in_threadpool(complete, model, tokenizer, [ids] * req.n, gen)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": None} for i, c in enumerate(results)]
        usage = _usage(results[0].prompt_tokens, sum(len(c.token_ids) for c in results))
        return {"id": rid, "object": "chat.completion", "created": created, "model": srv.name, "choices": choices,
                "usage": usage}

    return app


def _usage_chunk(req: _Options, s, template: dict) -> Optional[Callable[[], dict]]:
    """OpenAI's `stream_options.include_usage`: a last chunk with no choices and the token counts."""
    if req.stream_options is None or not req.stream_options.include_usage:
        return None
    return lambda: {**template, "choices": [], "usage": _usage(s.prompt_tokens, len(s.token_ids))}


def _stream_response(srv: _Server, s, head: list[dict], piece_chunk: Callable[[str], dict],
                     final_chunk: Callable[[], dict], usage_chunk: Optional[Callable[[], dict]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        for c in head:
            yield _sse(c)
        async with srv.lock:
            try:
                while True:
                    # one token step per worker-thread call, so the event loop keeps serving meanwhile
                    piece = await run_in_threadpool(next, s, None)
                    if piece is None:
                        break
                    yield _sse(piece_chunk(piece))
            finally:
                s.close()  # the client went away: stop generating
        yield _sse(final_chunk())
        if usage_chunk is not None:
            yield _sse(usage_chunk())
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- the command
def _check_bind(host: str, port: int) -> None:
    """Fail with one line now, rather than with uvicorn's log after loading the model."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
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


def serve(run: Union[str, Path], *, host: str = "127.0.0.1", port: int = 8000, which: str = "best",
          device: str = "auto", max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, log_level: str = "info",
          quantize: Optional[str] = None) -> None:
    """`scratchgpt serve RUN`: load the checkpoint once and serve it until Ctrl-C."""
    import uvicorn

    from .checkpoint import load_run
    from .quantize import quantize_model
    from .runtime import pick_device

    if max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit must be at least 1, got {max_tokens_limit}")
    _check_bind(host, port)
    loaded = load_run(run, which, device=pick_device(device))
    model, tokenizer, config = loaded.language_model("serve"), loaded.tokenizer, loaded.config
    quantize_model(model, quantize)
    run_path = Path(run).resolve()
    name = run_path.parent.name if run_path.name in ("best", "latest") else run_path.name
    app = create_app(model, tokenizer, config, name=name, max_tokens_limit=max_tokens_limit)
    if host not in _LOOPBACK:
        print(f"warning: listening on {host}: the server has no authentication, anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {name} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
