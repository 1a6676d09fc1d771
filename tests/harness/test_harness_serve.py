"""A served model is measurable too: lm-evaluation-harness's own `local-completions` backend pointed at
`scratchgpt serve` (echo + logprobs on /v1/completions, the server's remote tokenizer) gives the metrics
ScratchLM gives in process, within 1e-5 (the HTTP path carries floats as JSON)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")
for _needed in ("tenacity", "aiohttp", "requests"):  # lm-eval's `api` extra
    pytest.importorskip(_needed, reason="needs lm-eval[api]")

from conftest import live_server, load_lm  # noqa: E402
from harness_fixtures import bpe_data, family_runs, gpt2_run, harness_tasks, metrics  # noqa: E402,F401 (fixtures)
from local_tasks import LOGLIKELIHOOD_TASKS  # noqa: E402

from scratchgpt.harness.lm import ScratchLM  # noqa: E402
from scratchgpt.serve import create_app  # noqa: E402

pytestmark = pytest.mark.slow


def test_local_completions_on_serve_equals_the_in_process_lm(gpt2_run, harness_tasks):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    run, _ = gpt2_run
    model, tok, config = load_lm(run)
    ours = metrics(ScratchLM.from_run(run, batch_size=8), LOGLIKELIHOOD_TASKS, harness_tasks)
    with live_server(create_app(model, tok, config, name="tiny")) as url:
        served = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny", tokenizer_backend="remote",
                                     max_length=model.cfg.block_size, num_concurrent=1, max_retries=1, batch_size=8)
        theirs = metrics(served, LOGLIKELIHOOD_TASKS, harness_tasks)
    assert ours.keys() == theirs.keys() and {k.split("/")[1] for k in ours} >= {"acc,none", "acc_norm,none",
                                                                                 "perplexity,none"}
    assert all(math.isclose(ours[k], theirs[k], rel_tol=1e-5, abs_tol=1e-5) for k in ours), (ours, theirs)
