"""An OpenAI-compatible HTTP server for a trained run (`scratchgpt serve`), on FastAPI + uvicorn, with a chat page.

    GET  /                       a chat page (one self-contained HTML file: no CDN, works offline)
    GET  /health                 {"status": "ok", "model": NAME}
    GET  /v1/models              the one model served (its id is the run directory's name)
    POST /v1/completions         {"prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                                  "n", "echo", "logprobs", "stream", "repetition_penalty"}
    POST /v1/chat/completions    {"messages": [{"role", "content"}], ...the same options}
    GET  /tokenizer_info, POST /tokenize, POST /detokenize    the tokenizer, as vLLM serves it

Request and response shapes follow OpenAI's API, so its clients work (point them at
http://HOST:PORT/v1). A prompt is text or token ids. `logprobs` (an integer: the top alternatives
per token) and `echo` give OpenAI's legacy logprobs object (logprobs.py says what the numbers
are), which is what lm-evaluation-harness's `local-completions` reads. `top_k` and
`repetition_penalty` are extensions (as in vLLM); `model` is accepted and ignored, since one
model is served. Options this server can't honour (frequency/presence penalties, logit_bias,
best_of > 1, suffix, chat logprobs) are refused with a 400 rather than silently ignored.
`stream: true` answers with server-sent events (`data: {chunk}` lines, then `data: [DONE]`).

Chat prompts use the checkpoint's chat template when it has one (written by `finetune sft`),
laid out exactly as SFT trained on them; an imported instruct model's own jinja template is
rendered as transformers' apply_chat_template renders it (prompts.JinjaChatTemplate, in a
worker process bounded in time and size); without one, messages are joined as lines of plain
text, as `scratchgpt chat` does. Turns that don't fit the context are dropped oldest first.

The model is loaded once. Generation is not batched across requests: requests take turns, and the
event loop never runs model, tokenizer or template work (engine.py). An API key (--api-key or
$SCRATCHGPT_API_KEY) guards every route but / and /health; without one the server listens on
loopback only unless --insecure. Bodies, headers, connections and time are bounded (options.py,
guard.py, command.py), every error in OpenAI's error shape.

Modules: options (ServeOptions, the flags), schema (request bodies), guard (key and body limits),
engine (the model and its queue), routes (the generating endpoints), logprobs, app (create_app),
command (`serve`: uvicorn with connection limits), chat.html (the page).
"""

from __future__ import annotations

from typing import Any

from .options import ServeOptions, check_serve_options

__all__ = ["ServeOptions", "check_serve_options", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # create_app and serve need FastAPI (the `serve` extra) and torch: loaded on first use, so the CLI can
    # build `serve --help` from ServeOptions without them
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .command import serve

        return serve
    if name in ("CompletionRequest", "ChatRequest", "ChatMessage"):
        from . import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
