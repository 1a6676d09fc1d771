"""The released SmolLM2-135M-Instruct (tests/real_model.py), imported: lm-evaluation-harness through ScratchLM
gives the figures HFLM gives on the original transformers folder, on every local task kind, plain and in the
model's own chat template."""

from __future__ import annotations

import math

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from harness_fixtures import harness_tasks, hflm, metrics  # noqa: E402,F401 (fixtures)
from local_tasks import TASKS  # noqa: E402

from scratchgpt.harness.lm import ScratchLM  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_real_model_scores_as_hflm_on_its_folder(real_run, real_hf_dir, harness_tasks):
    """Every figure within 1e-6 (relative) in float64 on both sides; transformers' RMSNorm rounds to float32 whatever
    the model's dtype, hence not 0. (In float32, as users run it, LAMBADA's perplexity differs by ~4e-6, relative:
    float32 rounding of a 135M model's log-probabilities, summed in another order.)"""
    ours, theirs = ScratchLM.from_run(real_run, dtype="float64", batch_size=8), hflm(real_hf_dir, "float64", 8)
    assert (ours.prefix_token_id, ours.eot_token_id) == (theirs.prefix_token_id, theirs.eot_token_id)
    for tasks, options in ((TASKS, {}), (("tiny_arc_easy", "tiny_gsm8k"), {"apply_chat_template": True})):
        a = metrics(ours, tasks, harness_tasks, limit=2, **options)
        b = metrics(theirs, tasks, harness_tasks, limit=2, **options)
        assert a.keys() == b.keys()
        off = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-6)}
        assert not off, (options, off)
