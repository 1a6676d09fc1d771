"""sandbox.py: untrusted jinja templates render in a worker process, bounded in time, output and memory."""

from __future__ import annotations

import time

import pytest

from scratchgpt import UserError
from scratchgpt.sandbox import RenderTimeout, render

BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}ok"


def test_renders_as_jinja_does():
    assert render("{{ messages[0].content | upper }}{% if add %}!{% endif %}",
                  {"messages": [{"content": "hi"}], "add": True}) == "HI!"
    with pytest.raises(ValueError, match="nope"):
        render("{{ raise_exception('nope') }}", {})


@pytest.mark.slow
def test_a_loop_bomb_is_stopped_at_its_timeout_and_the_worker_comes_back():
    t0 = time.monotonic()
    with pytest.raises(RenderTimeout, match="limit of 1 s") as e:
        render(BOMB, {}, timeout=1.0)
    assert 0.9 < time.monotonic() - t0 < 5 and isinstance(e.value, UserError)
    assert render("{{ 1 + 1 }}", {}) == "2"  # a fresh worker
    t0 = time.monotonic()
    with pytest.raises(RenderTimeout, match="request's time"):  # a caller's deadline bounds it too
        render(BOMB, {}, timeout=30, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - t0 < 4


@pytest.mark.slow
def test_output_and_memory_are_capped():
    with pytest.raises(ValueError, match="longer than 1000 characters"):
        render("{% for i in range(100000) %}xxxxxxxxxx{% endfor %}", {}, max_chars=1000)
    with pytest.raises(ValueError, match="out of memory"):
        render("{{ 'a' * 10**10 }}", {})
    assert render("{{ 'ok' }}", {}) == "ok"


@pytest.mark.slow
def test_chat_stops_a_template_bomb_with_one_line(tmp_path):
    """`scratchgpt chat` with a run whose chat template never ends: one error line (J13 of the sweep)."""
    from conftest import cycling_model

    from scratchgpt.prompts import JinjaChatTemplate

    _, tok, config = cycling_model("abc", "hi\n", chat_template=BOMB)
    template = JinjaChatTemplate.of(tok, config, timeout=1.0)
    with pytest.raises(UserError, match="stopped"):
        template.encode([{"role": "user", "content": "hi"}])
