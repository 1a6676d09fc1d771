"""The FastAPI app: routes, the error handlers that keep every answer in OpenAI's error shape, and the OpenAPI
document. (No `from __future__ import annotations` here: FastAPI reads the routes' annotations, and those
name classes made inside create_app.)"""


from dataclasses import replace
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import UserError
from ..prompts import encode_with_eot
from .engine import ClientGone, Engine, Refused, Ticket
from .guard import Guard, error_response
from .routes import TicketStream, chat_completions, completions
from .options import MAX_BODY_BYTES, ServeOptions, check_api_key
from .schema import (MAX_TEXT_CHARS, UNSUPPORTED, UNSUPPORTED_IN_CHAT, ChatRequest, CompletionRequest, ErrorResponse,
                     TokenIds, with_token_limit)

RETRY_AFTER_S = 1
ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "invalid request (OpenAI's error shape, the field named in `param`)"), (401, "missing or wrong API key"),
    (408, "the request body arrived too slowly"), (413, "request body too large"),
    (503, "busy (see Retry-After) or shutting down"), (504, "the request ran past --request-timeout"))}
STREAMING_OK = {200: {"description": "the completion, or with `stream: true` server-sent events: a `data: {chunk}` "
                                     "line per piece of text (OpenAI's chunk objects), then `data: [DONE]`",
                      "content": {"application/json": {}, "text/event-stream": {}}}}


class TokenizeRequest(BaseModel):
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    tokens: TokenIds


def create_app(model, tokenizer, config: dict, *, name: str = "scratchgpt", options: Optional[ServeOptions] = None,
               **overrides) -> FastAPI:
    """The FastAPI app serving one loaded model (put in eval mode) with its tokenizer and config dict.
    `options` (or ServeOptions fields as keywords: max_tokens_limit=, api_key=, ...) bound what it accepts."""
    options = replace(options or ServeOptions(), **overrides)
    if options.api_key is not None:
        check_api_key(options.api_key)
    model.eval()
    engine = Engine(model, tokenizer, config, name, options)
    app = FastAPI(title="scratchgpt", version="1", docs_url="/docs", redoc_url=None)
    app.state.server = engine
    app.add_middleware(Guard, api_key=options.api_key, max_body=MAX_BODY_BYTES, body_timeout=options.body_timeout)
    _error_handlers(app)
    _info_routes(app, engine)
    _generation_routes(app, engine)
    if options.api_key:
        _document_bearer_auth(app)
    return app


def _generation_routes(app: FastAPI, engine: Engine) -> None:
    Completions = with_token_limit(CompletionRequest, engine.options.max_tokens_limit)
    Chats = with_token_limit(ChatRequest, engine.options.max_tokens_limit)

    @app.post("/v1/completions", responses={**STREAMING_OK, **ERRORS})
    async def completions_route(req: Completions, request: Request):  # type: ignore[valid-type]
        return await _ticketed(engine, request, completions, req)

    @app.post("/v1/chat/completions", responses={**STREAMING_OK, **ERRORS})
    async def chat_completions_route(req: Chats, request: Request):  # type: ignore[valid-type]
        return await _ticketed(engine, request, chat_completions, req)


async def _ticketed(engine: Engine, request: Request, handler, req):
    """`handler` with the request's Ticket: watched for a hang-up from now on, closed when the answer is made
    (a stream closes it when it ends)."""
    ticket = Ticket(engine, request.receive)
    try:
        response = await handler(engine, ticket, req)
    except BaseException:
        ticket.close()
        raise
    if not isinstance(response, TicketStream):
        ticket.done = True
        ticket.close()
    return response


def _info_routes(app: FastAPI, engine: Engine) -> None:
    tok = engine.tokenizer

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("scratchgpt.serve").joinpath("chat.html").read_text(encoding="utf-8")
        csp = "default-src 'self'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models", responses=ERRORS)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "scratchgpt"}]}

    @app.get("/tokenizer_info", responses=ERRORS)
    async def tokenizer_info() -> dict:
        """The tokenizer, as vLLM describes it (lm-evaluation-harness's `remote` tokenizer reads it)."""
        special = tok.special_tokens()
        return {"tokenizer_class": f"scratchgpt-{tok.kind}", "eos_token": special.get("eos_token", tok.eot_token),
                "bos_token": special.get("bos_token"), "pad_token": special.get("pad_token"),
                "model_max_length": engine.model.cfg.block_size, "vocab_size": tok.vocab_size,
                "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None}

    @app.post("/tokenize", responses=ERRORS)
    async def tokenize(req: TokenizeRequest) -> dict:
        """Text to ids as vLLM's /tokenize: special-token strings are the special tokens; `add_special_tokens`
        puts the tokenizer's BOS first."""
        ids = tok.encode_with_special_tokens(req.prompt) if tok.kind == "hf" else encode_with_eot(tok, req.prompt)
        ids = (tok.bos_ids if req.add_special_tokens else []) + ids
        return {"count": len(ids), "max_model_len": engine.model.cfg.block_size, "tokens": ids}

    @app.post("/detokenize", responses=ERRORS)
    async def detokenize(req: DetokenizeRequest) -> dict:
        return {"prompt": tok.decode(req.tokens)}


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(request, exc)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return error_response(400, str(exc), param="prompt" if str(exc).startswith("prompt:") else None)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        return error_response(exc.status, str(exc), kind=exc.kind,
                              headers={"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the log shows it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404 else
                              "invalid_request_error", headers=getattr(exc, "headers", None))  # 405: its Allow header

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # never expected; still OpenAI's shape
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 with OpenAI's error shape and the field named, not FastAPI's default 422 list."""
    unsupported = UNSUPPORTED + (UNSUPPORTED_IN_CHAT if request.url.path.endswith("/chat/completions") else ())
    errors = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON "
                                       f"({e.get('ctx', {}).get('error', 'parse error')})")
        # field names and list indices; not pydantic's tags for the members of a union ("list[str]")
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and (isinstance(x, int) or str(x).isidentifier())]
        if loc and loc[0] in unsupported:
            return error_response(400, f"{loc[0]}: not supported by this server (repetition_penalty is)", loc[0])
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
    return error_response(400, "; ".join(dict.fromkeys(msgs)) or "invalid request", param)


def _document_bearer_auth(app: FastAPI) -> None:
    """The OpenAPI document states the bearer key every route but / and /health needs (as Guard checks)."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                for op in operations.values():
                    if path not in ("/health", "/"):
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
