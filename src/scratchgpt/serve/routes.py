"""The generating endpoints, `/v1/completions` and `/v1/chat/completions`, plain and streamed (server-sent
events: `data: {chunk}` lines, then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, AsyncIterator, Callable, Optional

from starlette.responses import StreamingResponse

from .. import UserError
from ..generate import GenerationConfig, complete, stream
from .engine import Engine, Ticket
from .logprobs import Recorder, logprobs_object, prompt_entries
from .schema import GEN, ChatRequest, CompletionRequest, Options


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def gen_config(engine: Engine, req: Options, max_tokens: Optional[int], extra_stop: tuple = ()) -> GenerationConfig:
    default = min(GEN.max_new_tokens, engine.options.max_tokens_limit)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop += [s for s in extra_stop if s not in stop]
    # any seed is reduced to 63 bits by GenerationConfig itself, as for `sample --seed`
    return GenerationConfig(max_new_tokens=default if max_tokens is None else max_tokens, temperature=req.temperature,
                            top_k=req.top_k or None, top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                            stop=tuple(stop), seed=req.seed if req.seed is not None else secrets.randbits(62),
                            utf8_guard=engine.options.utf8_guard)


class TicketStream(StreamingResponse):
    """A stream that ends its request however it ends (even if the body never starts): the job stops at its
    next token and the model is handed on."""

    def __init__(self, ticket: Ticket, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.ticket.done:
                self.ticket.hang_up()
            self.ticket.close()


# ---------------------------------------------------------------- /v1/completions
async def completions(engine: Engine, ticket: Ticket, req: CompletionRequest):
    prompts = req.prompts()
    gen = gen_config(engine, req, req.max_tokens)
    k, block = req.logprobs, engine.model.cfg.block_size

    def encode() -> tuple[list, list]:  # unknown characters or ids: a 400 now, not mid-generation
        ids = [engine.prompt_ids(p) for p in prompts]
        if req.echo and k is not None and any(len(r) > block for r in ids):
            raise UserError(f"prompt: with echo and logprobs the prompt must fit the model's context of {block} "
                            "tokens")
        return ids, [p if isinstance(p, str) else engine.tokenizer.decode(r) for p, r in zip(prompts, ids)]

    ids, echoed = await engine.off_loop(ticket, encode)
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

    def chunk(text: str, finish: Optional[str], logprobs: Optional[dict] = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

    if req.stream:
        def head() -> list[dict]:  # in the model thread: the prompt's logprobs need a forward pass
            if not req.echo:
                return []
            lp = None
            if k is not None:
                lp = logprobs_object(engine.tokenizer, prompt_entries(engine.model, ids[0], k, engine.tokenizer.vocab_size))
            return [chunk(echoed[0], None, lp)] if echoed[0] or lp else []

        return await stream_response(engine, ticket, req, ids[0], gen, head, chunk, lambda: chunk("", None),
                                     offset=len(echoed[0]) if req.echo else 0)
    rows = [r for r in ids for _ in range(req.n)]
    rec = Recorder(len(rows), k, engine.tokenizer.vocab_size) if k is not None else None

    def job():
        results = complete(engine.model, engine.tokenizer, rows, gen, should_stop=ticket.should_stop, observe=rec)
        heads = [prompt_entries(engine.model, r, k, engine.tokenizer.vocab_size) for r in ids] \
            if req.echo and k is not None and not ticket.should_stop() else None
        return results, heads

    results, heads = await generate(engine, ticket, job)
    choices = []
    for i, c in enumerate(results):
        p = i // req.n
        logprobs = None
        if rec is not None:
            entries = rec.entries(i, len(c.token_ids))
            logprobs = logprobs_object(engine.tokenizer, heads[p] + entries) if req.echo else \
                logprobs_object(engine.tokenizer, entries, context=ids[p])
        choices.append({"index": i, "text": (echoed[p] if req.echo else "") + c.text,
                        "finish_reason": c.finish_reason, "logprobs": logprobs})
    n_prompt = sum(c.prompt_tokens for c in results[:: req.n])
    return {"id": rid, "object": "text_completion", "created": created, "model": engine.name, "choices": choices,
            "usage": usage(n_prompt, sum(len(c.token_ids) for c in results))}


# ---------------------------------------------------------------- /v1/chat/completions
async def chat_completions(engine: Engine, ticket: Ticket, req: ChatRequest):
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    gen = gen_config(engine, req, max_tokens, extra_stop=tuple(engine.template.stop) if engine.template else ())
    reserve = min(max(gen.max_new_tokens, 1), engine.model.cfg.block_size // 2)  # room for the reply, as `chat`
    ids = await engine.off_loop(ticket, engine.chat_prompt, req.messages, reserve, ticket.deadline)
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    def chunk(delta: dict, finish: Optional[str], logprobs: Optional[dict] = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    if req.stream:
        return await stream_response(engine, ticket, req, ids, gen, lambda: [chunk({"role": "assistant", "content": ""}, None)],
                                     lambda piece, finish, lp=None: chunk({"content": piece} if piece else {}, finish),
                                     lambda: chunk({}, None))

    def job():
        return complete(engine.model, engine.tokenizer, [ids] * req.n, gen, should_stop=ticket.should_stop)

    results = await generate(engine, ticket, job)
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": None} for i, c in enumerate(results)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name, "choices": choices,
            "usage": usage(results[0].prompt_tokens, sum(len(c.token_ids) for c in results))}


# ---------------------------------------------------------------- running the model
async def generate(engine: Engine, ticket: Ticket, job: Callable[[], Any]) -> Any:
    """A non-streamed job, in turn; past the deadline a 504 (shutdown: 503; the client gone: nothing)."""
    await engine.turn(ticket)
    result = await engine.run(ticket, job)
    if ticket.should_stop():
        raise ticket.refusal()
    return result


async def stream_response(engine: Engine, ticket: Ticket, req: Options, ids: list[int], gen: GenerationConfig,
                          head: Callable[[], list[dict]], piece_chunk: Callable, usage_template: Callable[[], dict],
                          offset: int = 0) -> StreamingResponse:
    """Wait for the model, then stream: the job runs in the model thread and hands pieces to the event loop."""
    await engine.turn(ticket)
    k = getattr(req, "logprobs", None)
    k = k if isinstance(k, int) and not isinstance(k, bool) else None
    rec = Recorder(1, k, engine.tokenizer.vocab_size) if k is not None else None
    s = stream(engine.model, engine.tokenizer, ids, gen, observe=rec)
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    produce = _producer(s, rec, head, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), ticket)

    async def events() -> AsyncIterator[str]:
        job = asyncio.ensure_future(engine.run(ticket, produce))
        context, text_len = list(ids), offset
        while True:
            kind, piece, entries = await queue.get()
            if kind == "head":
                yield sse(piece)
                continue
            lp = None
            if entries:
                lp = logprobs_object(engine.tokenizer, entries, context=context, offset=text_len)
                context += [t for t, _, _ in entries]
            text_len += len(piece)
            if kind == "end":
                break
            yield sse(piece_chunk(piece, None, lp))
        await job
        ticket.done = True
        if ticket.should_stop():  # the status line is sent already: the error goes in the stream, as OpenAI does
            refusal = ticket.refusal()
            yield sse({"error": {"message": str(refusal), "type": getattr(refusal, "kind", "server_error"),
                                 "param": None, "code": None}})
        else:
            yield sse(piece_chunk("", s.finish_reason, lp))
            if req.stream_options is not None and req.stream_options.include_usage:
                yield sse({**usage_template(), "choices": [], "usage": usage(s.prompt_tokens, len(s.token_ids))})
        yield "data: [DONE]\n\n"

    return TicketStream(ticket, events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _producer(s, rec: Optional[Recorder], head: Callable[[], list[dict]], put: Callable[[tuple], None],
              ticket: Ticket) -> Callable[[], None]:
    """The model-thread side of a stream: ("head", chunk, None) items, then ("piece", text, logprob entries) per
    piece of text, then ("end", "", the entries not sent yet), each handed to `put`."""
    sent = 0

    def new_entries(final: bool) -> Optional[list]:
        nonlocal sent
        if rec is None:
            return None
        upto = len(s.token_ids) if final else min(len(rec.steps[0]), len(s.token_ids))
        entries, sent = rec.entries(0, upto)[sent:], max(sent, upto)
        return entries

    def produce() -> None:
        try:
            for c in head():
                put(("head", c, None))
            for piece in s:
                put(("piece", piece, new_entries(False)))
                if ticket.should_stop():
                    break
        finally:
            s.close()
            put(("end", "", new_entries(True)))

    return produce
