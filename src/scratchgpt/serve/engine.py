"""The served model and the line in front of it.

Every request gets a Ticket when it arrives: its deadline (--request-timeout, counted from arrival, so prompt
building and waiting count too) and a watch on its connection. Prompts are built off the event loop, in a worker
thread (an imported model's jinja template renders in sandbox.py's killable process within the deadline), so
`/health` and every other client stay answered meanwhile. Requests then take turns on the model: at most
--max-queue wait (more get 503), each waits at most until its deadline, and a client that hangs up leaves the
line. The model runs in one dedicated thread; a job there stops at its next token when its client is gone, its
deadline has passed or the server is stopping, and the model is handed on only when that thread is done with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any, Callable, Optional

from .. import UserError
from ..prompts import ChatTemplate, JinjaChatTemplate, encode_conversation, fit_messages, fit_suffix
from .options import ServeOptions
from .schema import ChatMessage


class Refused(Exception):
    """A request turned away for load, time or shutdown: answered with `status` in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


class ClientGone(Exception):
    """The client hung up before its answer was ready: nothing is sent."""


class Ticket:
    """One request from its arrival: its deadline, whether its client is still there, its place in the line."""

    def __init__(self, engine: "Engine", receive: Optional[Callable] = None):
        self.engine = engine
        self.deadline = time.monotonic() + engine.options.request_timeout
        self.gone = threading.Event()  # read by the model thread
        self._gone = asyncio.Event()
        self.queued = self.held = False
        self.done = False  # its answer was given whole
        self.job: Optional[concurrent.futures.Future] = None  # the model thread's work, once submitted
        self._watch = asyncio.ensure_future(self._watch_disconnect(receive)) if receive is not None else None

    async def _watch_disconnect(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.hang_up()
                return

    def hang_up(self) -> None:
        self.gone.set()
        self._gone.set()

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def should_stop(self) -> bool:
        """The client is gone, the deadline has passed, or the server is stopping: generation stops now."""
        return self.gone.is_set() or self.engine.stopping or time.monotonic() > self.deadline

    def refusal(self) -> Exception:
        if self.gone.is_set():
            return ClientGone()
        if self.engine.stopping:
            return Refused(503, "the server is shutting down", "server_error")
        return Refused(504, f"the request took longer than the server's --request-timeout of "
                            f"{self.engine.options.request_timeout:g} s; ask for fewer max_tokens", "timeout")

    def release(self) -> None:
        """Hand the model on (called once the model thread is done), or leave the line."""
        if self.held:
            self.held = False
            self.engine.lock.release()
        if self.queued:
            self.queued = False
            self.engine.pending -= 1

    def close(self) -> None:
        """The request is over: stop watching its connection (the model is released by its job)."""
        if self._watch is not None:
            self._watch.cancel()
        if self.job is None:  # else the job hands the model on when it ends
            self.release()


class Engine:
    """The loaded model, what every request needs from it, and the line in front of it."""

    def __init__(self, model, tokenizer, config: dict, name: str, options: ServeOptions):
        self.model, self.tokenizer, self.config, self.name, self.options = model, tokenizer, config, name, options
        self.template = ChatTemplate.from_config(config)  # a malformed template fails at startup, not per request
        # an imported instruct model's jinja template; one that doesn't compile fails chat requests (400) only
        self.jinja: Optional[JinjaChatTemplate] = None
        self.jinja_error: Optional[UserError] = None
        try:
            self.jinja = JinjaChatTemplate.of(tokenizer, config, timeout=options.template_timeout)
            if self.jinja is not None:
                self.jinja.warm()
        except UserError as e:
            self.jinja_error = e
        self.created = int(time.time())
        self.lock = asyncio.Lock()
        self.pending = 0  # admitted requests: the one generating and those waiting for the model
        self.stopping = False
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scratchgpt-model")

    # ---------------------------------------------------------------- the line
    async def turn(self, ticket: Ticket) -> None:
        """Wait for the model: 503 at once when --max-queue requests already wait, or at the deadline; a client
        that hangs up meanwhile leaves the line (ClientGone)."""
        if self.stopping:
            raise Refused(503, "the server is shutting down", "server_error")
        if self.pending > self.options.max_queue:
            raise Refused(503, f"the server is busy ({self.pending - 1} requests waiting, --max-queue "
                               f"{self.options.max_queue}); retry later", "server_error")
        ticket.queued = True
        self.pending += 1
        acquire = asyncio.ensure_future(self.lock.acquire())
        gone = asyncio.ensure_future(ticket._gone.wait())
        try:
            await asyncio.wait({acquire, gone}, timeout=ticket.remaining(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not acquire.done():
                acquire.cancel()  # (a cancelled Lock.acquire never takes the lock)
        if acquire.done() and not acquire.cancelled():
            ticket.held = True
            return
        ticket.release()
        if ticket.gone.is_set():
            raise ClientGone()
        raise Refused(503, f"the server is busy: no turn within --request-timeout {self.options.request_timeout:g} "
                           "s; retry later", "server_error")

    async def run(self, ticket: Ticket, job: Callable[[], Any]) -> Any:
        """`job()` in the model thread, once `ticket` holds the model (Engine.turn). The model is handed on when
        the job returns, not when this coroutine ends: a job outlives a cancelled caller by one token at most."""
        loop = asyncio.get_running_loop()
        future = ticket.job = self.model_thread.submit(job)

        def handed_on(_) -> None:
            try:
                loop.call_soon_threadsafe(ticket.release)
            except RuntimeError:  # the loop is closed: the server is gone anyway
                pass

        future.add_done_callback(handed_on)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            ticket.hang_up()  # stops the job at its next token
            raise

    async def off_loop(self, ticket: Ticket, fn: Callable, *args) -> Any:
        """fn(*args) in a worker thread (not the model's), within the ticket's deadline."""
        from starlette.concurrency import run_in_threadpool

        try:
            return await asyncio.wait_for(run_in_threadpool(fn, *args), ticket.remaining())
        except asyncio.TimeoutError:
            raise Refused(504, f"building the prompt took longer than the server's --request-timeout of "
                               f"{self.options.request_timeout:g} s", "timeout") from None

    # ---------------------------------------------------------------- prompts
    def chat_prompt(self, messages: list[ChatMessage], reserve: int, deadline: float) -> list[int]:
        """Token ids of the conversation, ending where the assistant's reply begins; the oldest turns dropped
        until it fits the context less `reserve` (a binary search: log2(n) encodings, not n)."""
        budget = self.model.cfg.block_size - reserve
        if self.jinja_error is not None:
            raise self.jinja_error
        if self.jinja is not None:  # the template sees a developer message as the system message it is
            return fit_messages(self.jinja, [{"role": "system" if m.role == "developer" else m.role,
                                              "content": m.text()} for m in messages], budget, deadline=deadline)[0]
        system = [m.text() for m in messages if m.role in ("system", "developer")]
        turns = [(m.role, m.text()) for m in messages if m.role not in ("system", "developer")]
        ids, _ = fit_suffix(lambda k: self._encode_chat(system, turns[k:]), [r == "user" for r, _ in turns], budget)
        return ids  # still too long: generation keeps the last block_size tokens

    def _encode_chat(self, system: list[str], turns: list[tuple[str, str]]) -> list[int]:
        tok = self.tokenizer
        if self.template is not None:  # the layout SFT trained on, token for token
            ids, _ = encode_conversation(tok, self.config["chat_template"], [("system", s) for s in system] + turns)
            return ids
        # no template: one running text, a line per message, as `scratchgpt chat` continues it
        lines = system + [text for _, text in turns]
        return tok.bos_ids + tok.encode("".join(t if t.endswith("\n") else t + "\n" for t in lines))

    def prompt_ids(self, prompt) -> list[int]:
        """A completion prompt's ids: text as `sample` encodes it (with the tokenizer's BOS), or checked ids."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            return tok.bos_ids + tok.encode(prompt)
        bad = next((i for i in prompt if i >= tok.vocab_size), None)
        if bad is not None:
            raise UserError(f"prompt: token id {bad} is outside the vocabulary (size {tok.vocab_size})")
        return list(prompt)
