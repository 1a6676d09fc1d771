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
laid out exactly as SFT trained on them; an imported instruct model's own jinja template is
rendered as transformers' apply_chat_template renders it (prompts.JinjaChatTemplate); without one, messages are joined as lines of plain
text, as `scratchgpt chat` does. Turns that don't fit the context are dropped oldest first.

The model is loaded once. Generation is CPU-bound and not batched across requests, so
requests take turns behind an asyncio lock; they wait there without holding a worker thread.
There is no authentication: by default the server listens on 127.0.0.1 only.
"""

import asyncio
import json
import math
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictStr, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import UserError
from .checks import bounds
from .generate import GENERATION_RANGES, MAX_NEW_TOKENS, Completion, GenerationConfig, complete, stream
from .prompts import ChatTemplate, JinjaChatTemplate, encode_conversation, fit_messages

_GEN = GenerationConfig()  # the defaults shared with `sample`, `chat` and the Python API

DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_QUEUE = 16
DEFAULT_REQUEST_TIMEOUT_S = 300.0
MAX_TEXT_CHARS = 100_000  # a prompt, or a conversation in all: far past any context this serves
MAX_BODY_BYTES = 16 * 2**20
RETRY_AFTER_S = 1
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# OpenAI options this server can't honour: a request may send them at their neutral values only
UNSUPPORTED = ("logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "best_of", "suffix")


def _limit(name: str) -> Any:
    """A request field with GenerationConfig's default and allowed range: one declaration for CLI and API."""
    return Field(getattr(_GEN, name), **bounds(GENERATION_RANGES[name]))


def _no_text(value: Any) -> Any:
    if isinstance(value, (str, bool)):  # JSON Schema's integer includes 1.0, but never "1" or true
        raise ValueError("Input should be a valid integer")
    return value


Int = Annotated[int, BeforeValidator(_no_text)]


def _int(**limits: int) -> Any:
    """An integer type within `limits` (ge/le): inside the type, so the OpenAPI document shows them for
    Optional fields too."""
    return Annotated[int, Field(**limits), BeforeValidator(_no_text)]  # (limits first: then they reach the schema)


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
StopText = Annotated[str, Field(max_length=256)]


# ---------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Options(BaseModel):
    """Sampling options shared by both endpoints; unknown fields (e.g. `user`) are ignored, as OpenAI does.
    Booleans and integers are strict (no "yes" or "5"), numbers finite; ranges are GenerationConfig's."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Optional[Annotated[StrictStr, Field(max_length=256)]] = None
    max_tokens: Optional[_int(ge=0, le=MAX_NEW_TOKENS)] = None
    temperature: StrictFloat = _limit("temperature")
    top_p: StrictFloat = _limit("top_p")
    top_k: Optional[_int(**bounds(GENERATION_RANGES["top_k"]))] = _GEN.top_k
    repetition_penalty: StrictFloat = _limit("repetition_penalty")
    stop: Union[StopText, Annotated[list[StopText], Field(max_length=4)], None] = None
    seed: Optional[Int] = Field(None, description="any integer; reduced modulo 2**63 as `sample --seed` does")
    n: _int(ge=1, le=16) = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Union[Literal[False], _int(ge=0, le=0), None] = None
    top_logprobs: Optional[_int(ge=0, le=0)] = None
    frequency_penalty: Optional[Annotated[StrictFloat, Field(ge=0, le=0)]] = None
    presence_penalty: Optional[Annotated[StrictFloat, Field(ge=0, le=0)]] = None
    logit_bias: Optional[Annotated[dict[str, float], Field(max_length=0)]] = None
    best_of: Optional[_int(ge=1, le=1)] = None

    @model_validator(mode="after")
    def _check_stream(self):
        if self.stream and self.n > 1:
            raise ValueError("stream supports n=1 only")
        return self


class CompletionRequest(_Options):
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=16)]]
    echo: StrictBool = False
    suffix: Optional[Annotated[str, Field(max_length=0)]] = None

    @model_validator(mode="after")
    def _check(self):
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise ValueError("stream supports a single prompt only")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, Annotated[list[TextPart], Field(max_length=256)]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Options):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: Optional[_int(ge=0, le=MAX_NEW_TOKENS)] = None  # OpenAI's newer name

    @model_validator(mode="after")
    def _check(self):
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be the user's (the server writes the reply)")
        seen_other = False
        for m in self.messages:
            if m.role in ("system", "developer") and seen_other:
                raise ValueError("messages: system messages must come before the conversation")
            seen_other = seen_other or m.role not in ("system", "developer")
        chars = sum(len(m.text()) for m in self.messages)
        if chars > MAX_TEXT_CHARS:
            raise ValueError(f"messages: {chars} characters in all, more than the {MAX_TEXT_CHARS} allowed")
        return self


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every 4xx and 5xx."""

    error: ErrorBody


def _with_token_limit(cls: type[_Options], limit: int) -> type[_Options]:
    """`cls` with max_tokens (and max_completion_tokens) capped at this server's --max-tokens-limit, so the
    OpenAPI document states the real limit."""
    capped = (Optional[_int(ge=0, le=limit)], None)
    fields = {"max_tokens": capped}
    if "max_completion_tokens" in cls.model_fields:
        fields["max_completion_tokens"] = capped
    from pydantic import create_model

    return create_model(cls.__name__, __base__=cls, **fields)  # type: ignore[call-overload]


# ---------------------------------------------------------------- responses
def _error(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
           code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Refused(Exception):
    """A request turned away for load, time or shutdown: answered with `status` in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


class _Turn:
    """One admitted request: counted against --max-queue, holding the model once `Server.turn` returns."""

    def __init__(self, srv: "_Server"):
        self.srv, self.held = srv, False
        self.deadline = time.monotonic() + srv.request_timeout

    def expired(self) -> bool:
        """Past the request's deadline, or the server is shutting down: generation stops at the next token."""
        return self.srv.stopping or time.monotonic() > self.deadline

    def refusal(self) -> _Refused:
        if self.srv.stopping:
            return _Refused(503, "the server is shutting down", "server_error")
        return _Refused(504, f"generation took longer than the server's --request-timeout of "
                             f"{self.srv.request_timeout:g} s; ask for fewer max_tokens", "timeout")

    def release(self) -> None:
        if self.held:
            self.held = False
            self.srv.lock.release()
            self.srv.pending -= 1


class _Server:
    """The loaded model, what every request needs from it, and the queue in front of it."""

    def __init__(self, model, tokenizer, config: dict, name: str, max_tokens_limit: int, max_queue: int,
                 request_timeout: float):
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        self.max_tokens_limit, self.max_queue, self.request_timeout = max_tokens_limit, max_queue, request_timeout
        self.template = ChatTemplate.from_config(config)  # a malformed template fails at startup, not per request
        # an imported instruct model's jinja template; one that doesn't compile fails chat requests (400) only
        self.jinja: Optional[JinjaChatTemplate] = None
        self.jinja_error: Optional[UserError] = None
        try:
            self.jinja = JinjaChatTemplate.of(tokenizer, config)
        except UserError as e:
            self.jinja_error = e
        self.created = int(time.time())
        self.lock = asyncio.Lock()
        self.pending = 0  # admitted requests: the one generating and those waiting for the model
        self.stopping = False

    async def turn(self) -> _Turn:
        """Wait for the model: 503 at once when --max-queue requests already wait, or after --request-timeout."""
        if self.stopping:
            raise _Refused(503, "the server is shutting down", "server_error")
        if self.pending > self.max_queue:
            raise _Refused(503, f"the server is busy ({self.pending - 1} requests waiting, --max-queue "
                                f"{self.max_queue}); retry later", "server_error")
        turn = _Turn(self)
        self.pending += 1
        try:
            await asyncio.wait_for(self.lock.acquire(), timeout=self.request_timeout)
        except asyncio.TimeoutError:
            self.pending -= 1
            raise _Refused(503, f"the server is busy: no turn within --request-timeout {self.request_timeout:g} s; "
                                "retry later", "server_error") from None
        except BaseException:  # the client went away while waiting
            self.pending -= 1
            raise
        turn.held = True
        return turn

    def gen_config(self, req: _Options, max_tokens: Optional[int], default: int, extra_stop: tuple = ()) -> GenerationConfig:
        max_tokens = default if max_tokens is None else max_tokens
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stop += [s for s in extra_stop if s not in stop]
        # any seed is reduced to 63 bits by GenerationConfig itself, as for `sample --seed`
        return GenerationConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k or None,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, stop=tuple(stop),
                                seed=req.seed if req.seed is not None else secrets.randbits(62))

    def chat_prompt(self, messages: list[ChatMessage], reserve: int) -> list[int]:
        """Token ids of the conversation, ending where the assistant's reply begins."""
        budget = self.model.cfg.block_size - reserve
        if self.jinja_error is not None:
            raise self.jinja_error
        if self.jinja is not None:  # the template sees a developer message as the system message it is
            return fit_messages(self.jinja, [{"role": "system" if m.role == "developer" else m.role,
                                              "content": m.text()} for m in messages], budget)[0]
        system = [m.text() for m in messages if m.role in ("system", "developer")]
        turns = [(m.role, m.text()) for m in messages if m.role not in ("system", "developer")]
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
        return tok.bos_ids + tok.encode("".join(t if t.endswith("\n") else t + "\n" for t in lines))


class _Guard:
    """ASGI middleware in front of every route: the API key (all but /health, as vLLM and OpenAI's API check
    it) and a cap on the request body, both answered in OpenAI's error shape."""

    def __init__(self, app, api_key: Optional[str]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.expected is not None and scope["path"] != "/health" and \
                    not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = _error(401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                response = _error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


_ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "invalid request (OpenAI's error shape, the field named in `param`)"), (401, "missing or wrong API key"),
    (413, "request body too large"), (503, "busy (see Retry-After) or shutting down"),
    (504, "generation ran past --request-timeout"))}
_STREAMING_OK = {200: {"description": "the completion, or with `stream: true` server-sent events: a `data: {chunk}` "
                                      "line per piece of text (OpenAI's chunk objects), then `data: [DONE]`",
                       "content": {"application/json": {}, "text/event-stream": {}}}}


def create_app(model, tokenizer, config: dict, *, name: str = "scratchgpt",
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, api_key: Optional[str] = None,
               max_queue: int = DEFAULT_MAX_QUEUE, request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving one loaded model (in eval mode) with its tokenizer and config dict."""
    srv = _Server(model, tokenizer, config, name, max_tokens_limit, max_queue, request_timeout)
    app = FastAPI(title="scratchgpt", version="1", docs_url="/docs", redoc_url=None)
    app.state.server = srv
    app.add_middleware(_Guard, api_key=api_key)
    Completions = _with_token_limit(CompletionRequest, max_tokens_limit)
    Chats = _with_token_limit(ChatRequest, max_tokens_limit)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # 400 with OpenAI's error shape and the field named, not FastAPI's default 422 list
        errors = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                return _error(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
            # field names and list indices; not pydantic's tags for the members of a union ("list[str]")
            loc = [str(x) for x in e.get("loc", ()) if x != "body" and (isinstance(x, int) or str(x).isidentifier())]
            if loc and loc[0] in UNSUPPORTED:
                return _error(400, f"{loc[0]}: not supported by this server (repetition_penalty is)", loc[0])
            errors.append((".".join(loc), e))
        # of a union's errors, the member the value's type matched says what is wrong with it
        specific = {where for where, e in errors if not e.get("type", "").endswith("_type")}
        msgs, param = [], None
        for where, e in errors:
            if where in specific and e.get("type", "").endswith("_type"):
                continue
            param = param or where or None
            text = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
            msgs.append(f"{where}: {text}" if where and not text.startswith(where) else text)
        return _error(400, "; ".join(dict.fromkeys(msgs)) or "invalid request", param)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused) -> JSONResponse:
        return _error(exc.status, str(exc), kind=exc.kind,
                      headers={"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404 else
                      "invalid_request_error", headers=getattr(exc, "headers", None))  # 405: its Allow header

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # never expected; still OpenAI's shape
        return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": srv.name}

    @app.get("/v1/models", responses=_ERRORS)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "scratchgpt"}]}

    @app.post("/v1/completions", responses={**_STREAMING_OK, **_ERRORS})
    async def completions(req: Completions):  # type: ignore[valid-type]
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
            return _stream_response(await srv.turn(), s, head, lambda piece: chunk(piece, None),
                                    lambda: chunk("", s.finish_reason), _usage_chunk(req, s, chunk("", None)))
        rows = [p for p in ids for _ in range(req.n)]
        results = await _generate(srv, rows, gen)
        choices = [{"index": i, "text": (prompts[i // req.n] if req.echo else "") + c.text,
                    "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(results)]
        usage = _usage(sum(c.prompt_tokens for c in results[::req.n]), sum(len(c.token_ids) for c in results))
        return {"id": rid, "object": "text_completion", "created": created, "model": srv.name, "choices": choices,
                "usage": usage}

    @app.post("/v1/chat/completions", responses={**_STREAMING_OK, **_ERRORS})
    async def chat_completions(req: Chats):  # type: ignore[valid-type]
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
            return _stream_response(await srv.turn(), s, [chunk({"role": "assistant", "content": ""}, None)],
                                    lambda piece: chunk({"content": piece}, None),
                                    lambda: chunk({}, s.finish_reason), _usage_chunk(req, s, chunk({}, None)))
        results = await _generate(srv, [ids] * req.n, gen)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": None} for i, c in enumerate(results)]
        usage = _usage(results[0].prompt_tokens, sum(len(c.token_ids) for c in results))
        return {"id": rid, "object": "chat.completion", "created": created, "model": srv.name, "choices": choices,
                "usage": usage}

    if api_key:
        _document_bearer_auth(app)
    return app


def _document_bearer_auth(app: FastAPI) -> None:
    """The OpenAPI document states the bearer key every route but /health needs (as the middleware checks)."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                for op in operations.values():
                    if path != "/health":
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _generate(srv: _Server, rows: list, gen: GenerationConfig) -> list[Completion]:
    """Non-streamed completions in a worker thread, in turn; past the deadline a 504 (shutdown: 503)."""
    turn = await srv.turn()
    try:
        results = await run_in_threadpool(complete, srv.model, srv.tokenizer, rows, gen, should_stop=turn.expired)
    finally:
        turn.release()
    if turn.expired():
        raise turn.refusal()
    return results


def _usage_chunk(req: _Options, s, template: dict) -> Optional[Callable[[], dict]]:
    """OpenAI's `stream_options.include_usage`: a last chunk with no choices and the token counts."""
    if req.stream_options is None or not req.stream_options.include_usage:
        return None
    return lambda: {**template, "choices": [], "usage": _usage(s.prompt_tokens, len(s.token_ids))}


class _TurnResponse(StreamingResponse):
    """Releases the model when the response ends, however it ends (even if the body never starts)."""

    def __init__(self, turn: _Turn, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.turn = turn

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.turn.release()


def _stream_response(turn: _Turn, s, head: list[dict], piece_chunk: Callable[[str], dict],
                     final_chunk: Callable[[], dict], usage_chunk: Optional[Callable[[], dict]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        for c in head:
            yield _sse(c)
        try:
            while True:
                if turn.expired():  # the status line is sent already: the error goes in the stream, as OpenAI does
                    refusal = turn.refusal()
                    yield _sse({"error": {"message": str(refusal), "type": refusal.kind, "param": None, "code": None}})
                    yield "data: [DONE]\n\n"
                    return
                # one token step per worker-thread call, so the event loop keeps serving meanwhile
                piece = await run_in_threadpool(next, s, None)
                if piece is None:
                    break
                yield _sse(piece_chunk(piece))
        finally:
            s.close()  # the client went away, or the deadline passed: stop generating
            turn.release()
        yield _sse(final_chunk())
        if usage_chunk is not None:
            yield _sse(usage_chunk())
        yield "data: [DONE]\n\n"

    return _TurnResponse(turn, events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


def check_serve_options(host: str, port: int, max_tokens_limit: int, api_key: Optional[str], insecure: bool,
                        max_queue: int, request_timeout: float) -> None:
    """Every serve option, checked before the model loads."""
    if not 1 <= max_tokens_limit <= MAX_NEW_TOKENS:
        raise UserError(f"--max-tokens-limit must be in [1, {MAX_NEW_TOKENS}], got {max_tokens_limit}")
    if not 0 <= max_queue <= 1_000_000:
        raise UserError(f"--max-queue must be in [0, 1000000], got {max_queue}")
    if not (math.isfinite(request_timeout) and request_timeout > 0):
        raise UserError(f"--request-timeout must be a number of seconds > 0, got {request_timeout}")
    if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key)):
        raise UserError("--api-key (or SCRATCHGPT_API_KEY) must be a non-empty key without spaces")
    if host not in _LOOPBACK and not api_key and not insecure:
        raise UserError(f"--host {host} lets other machines in, and there is no API key: give --api-key KEY (or "
                        "SCRATCHGPT_API_KEY), or --insecure to serve without one")
    _check_bind(host, port)


def serve(run: Union[str, Path], *, host: str = "127.0.0.1", port: int = 8000, which: str = "best",
          device: str = "auto", max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, log_level: str = "info",
          quantize: Optional[str] = None, api_key: Optional[str] = None, insecure: bool = False,
          max_queue: int = DEFAULT_MAX_QUEUE, request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
    """`scratchgpt serve RUN`: load the checkpoint once and serve it until Ctrl-C or SIGTERM, which stop it
    gracefully: no new connections, in-flight requests cancelled at their next token, exit 0."""
    import uvicorn

    from .checkpoint import load_run
    from .quantize import quantize_model
    from .runtime import pick_device

    api_key = api_key if api_key is not None else (os.environ.get("SCRATCHGPT_API_KEY") or None)
    check_serve_options(host, port, max_tokens_limit, api_key, insecure, max_queue, request_timeout)
    loaded = load_run(run, which, device=pick_device(device))
    model, tokenizer, config = loaded.language_model("serve"), loaded.tokenizer, loaded.config
    quantize_model(model, quantize)
    run_path = Path(run).resolve()
    name = run_path.parent.name if run_path.name in ("best", "latest") else run_path.name
    app = create_app(model, tokenizer, config, name=name, max_tokens_limit=max_tokens_limit, api_key=api_key,
                     max_queue=max_queue, request_timeout=request_timeout)
    if host not in _LOOPBACK and not api_key:
        print(f"warning: listening on {host} without an API key (--insecure): anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {name} at http://{host}:{port}/v1 (OpenAI-compatible; "
          f"{'API key required' if api_key else 'no API key'}; Ctrl-C stops)", file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    _graceful_server(config, app.state.server).run()
    print("server stopped", file=sys.stderr)


def _graceful_server(config, srv: _Server):
    """uvicorn's server, which on SIGTERM/SIGINT also stops the generations in flight (at their next token), and
    doesn't re-raise the signal after its graceful shutdown (that would end the process with the signal's status,
    not 0)."""
    import uvicorn

    class Graceful(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            srv.stopping = True
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29 re-raises these on exit
            if isinstance(captured, list):
                captured.clear()

    return Graceful(config)
