"""Untrusted jinja templates (an imported model's chat template), compiled in a sandbox and rendered in a worker
process that can be killed: a render is bounded in time, output size and memory.

The sandbox (transformers' own environment, `compile_jinja`) keeps a template away from files, attributes and
code, but not from burning CPU: `{% for i in range(10**5) %}{% for j in range(10**5) %}...` is legal and runs
for hours, and a thread can't be interrupted (a signal only reaches the main thread, and not inside C code).
So templates render in one child process per Python process (started on first use: a fresh interpreter, no copy
of the parent's threads or model), which caches each compiled template. A render that takes longer than its timeout
kills the child (the next render starts a new one); output is counted while it is produced and cut off at
`max_chars`; the child's address space is capped (`RLIMIT_AS`), so a `'a' * 10**10` is a MemoryError there.
Requests and replies cross a pipe as JSON, never pickle.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from . import UserError
from .utils import first_line

RENDER_TIMEOUT_S = 10.0  # a chat template renders in milliseconds; seconds mean a loop bomb
MAX_RENDER_CHARS = 4 * 2**20  # far past any conversation a context can hold
WORKER_MEMORY_BYTES = 2**31  # the child's address space: python + jinja need ~50 MB


def compile_jinja(source: str):
    """transformers.utils.chat_template_utils._cached_compile_jinja_template's sandboxed environment: the same
    options (trim_blocks, lstrip_blocks, loopcontrols), filter (tojson) and globals (raise_exception,
    strftime_now, dict, namespace); its {% generation %} tag (assistant masks) is left out.
    Returns (template, the literal text it writes, joined by NULs)."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:  # dict() without attribute access to the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore-prefixed attributes (CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    ast = env.parse(source)
    # transformers' _get_template_literal_text: the added tokens the template writes itself are control tokens
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return env.from_string(source), "\0".join(literals)


def jinja_error(e: BaseException) -> str:
    """A jinja (or Python) error as one short line, with the template line when jinja knows it."""
    where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
    return f"{first_line(e, 300)}{where}"


# ---------------------------------------------------------------- the child
def _limit_memory(limit: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not on this platform: time and output are still bounded
        pass


def _render_capped(template, variables: dict, max_chars: int) -> str:
    out, size = [], 0
    for piece in template.generate(**variables):  # counted as produced: a runaway output stops early
        size += len(piece)
        if size > max_chars:
            raise ValueError(f"the rendered text is longer than {max_chars} characters")
        out.append(piece)
    return "".join(out)


def child_main() -> None:
    """The worker's loop: a JSON line {"source", "variables", "max_chars"} in, {"text"} or {"error"} out, on
    stdin/stdout, until EOF."""
    _limit_memory(WORKER_MEMORY_BYTES)
    compiled: dict[str, Any] = {}
    out = sys.stdout
    for line in sys.stdin:
        try:
            request = json.loads(line)
            source = request["source"]
            if source not in compiled:
                if len(compiled) >= 16:
                    compiled.clear()
                compiled[source] = compile_jinja(source)[0]
            reply = {"text": _render_capped(compiled[source], request["variables"], request["max_chars"])}
        except MemoryError:
            reply = {"error": "the template ran out of memory"}
        except Exception as e:  # TemplateError from raise_exception, or a template bug (UndefinedError, ...)
            reply = {"error": jinja_error(e)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ---------------------------------------------------------------- the parent
class RenderTimeout(UserError):
    """A template ran past its time limit (its worker was killed)."""


class _Worker:
    """The one worker process of this Python process, shared by every template; renders take turns.

    A plain `python -c` child (not multiprocessing's spawn, which would re-run the caller's main script)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: Optional[subprocess.Popen] = None

    def _start(self) -> None:
        src = str(Path(__file__).resolve().parents[1])  # this scratchgpt, whatever the child's sys.path
        code = f"import sys; sys.path.insert(0, {src!r}); from scratchgpt.sandbox import child_main; child_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, encoding="utf-8", errors="surrogatepass")

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self.proc = None

    def render(self, source: str, variables: dict, max_chars: int, deadline: float) -> dict:
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RenderTimeout("the chat template could not render: other renders held the worker")
        try:
            if self.proc is None or self.proc.poll() is not None:
                self._kill()
                self._start()
            proc = self.proc
            try:
                proc.stdin.write(json.dumps({"source": source, "variables": variables, "max_chars": max_chars}) + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                line = proc.stdout.readline() if ready else None
            except (OSError, ValueError):
                line = ""
            if line is None:
                self._kill()  # the only way to stop a render mid-loop
                raise RenderTimeout("the chat template was stopped")
            if not line:  # the child died (its memory cap, or killed from outside)
                self._kill()
                return {"error": "the template's worker process died"}
            return json.loads(line)
        finally:
            self.lock.release()


_WORKER = _Worker()


def start_worker() -> None:
    """Start the worker process now rather than at the first render (a server does it before it listens: a
    fork from a big process is slow, and holds the interpreter meanwhile)."""
    with _WORKER.lock:
        if _WORKER.proc is None or _WORKER.proc.poll() is not None:
            _WORKER._kill()
            _WORKER._start()


def render(source: str, variables: dict, *, timeout: float = RENDER_TIMEOUT_S, max_chars: int = MAX_RENDER_CHARS,
           deadline: Optional[float] = None) -> str:
    """`source` rendered with `variables` (JSON values) in the worker process, within `timeout` seconds (and
    before `deadline`, a time.monotonic() value, if given). Errors: RenderTimeout (a UserError) past the time;
    ValueError with jinja's one-line message for a template error or an output over `max_chars`."""
    end = time.monotonic() + timeout
    try:
        reply = _WORKER.render(source, variables, max_chars, end if deadline is None else min(end, deadline))
    except RenderTimeout as e:
        limit = f"its limit of {timeout:g} s" if deadline is None or end <= deadline else "the request's time"
        raise RenderTimeout(f"{e}: it ran past {limit}") from None
    if "error" in reply:
        raise ValueError(reply["error"])
    return reply["text"]
