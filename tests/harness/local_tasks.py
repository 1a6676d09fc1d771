"""Tiny local copies of harness datasets, in the exact schema of the hub's (Rowan/hellaswag, allenai/ai2_arc,
EleutherAI/lambada_openai, EleutherAI/wikitext_document_level, openai/gsm8k), and task YAMLs that include the
harness's own YAML for each (its prompts, processing, metrics and filters) over them with `dataset_path: json`.
Text comes from CPython's bundled docs (conftest.english_text): no network."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from conftest import english_text

TASKS = ("tiny_hellaswag", "tiny_arc_easy", "tiny_lambada", "tiny_wikitext", "tiny_gsm8k")
LOGLIKELIHOOD_TASKS = ("tiny_hellaswag", "tiny_arc_easy", "tiny_lambada")


def _sentences(n: int, seed: int, words: tuple[int, int] = (6, 12)) -> list[str]:
    text = re.findall(r"[A-Za-z]+", english_text(60_000))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        at = rng.randrange(len(text) - words[1])
        out.append(" ".join(text[at : at + rng.randint(*words)]))
    return out


def _hellaswag(n: int, seed: int, words: tuple[int, int] = (6, 12)) -> list[dict]:
    s, rng = _sentences(5 * n, seed, words), random.Random(seed)
    docs = []
    for i in range(n):
        ctx_a, ctx_b = s[5 * i], s[5 * i + 1].split(" ", 2)
        docs.append({"ind": i, "activity_label": s[5 * i + 2].split(" ")[0].capitalize(), "ctx_a": ctx_a + ".",
                     "ctx_b": " ".join(ctx_b[:2]), "ctx": f"{ctx_a}. {' '.join(ctx_b[:2])}",
                     "endings": [ctx_b[2] if len(ctx_b) > 2 else "it", s[5 * i + 3], s[5 * i + 4], s[5 * i + 2]],
                     "source_id": f"activitynet~v_{i}", "split": "val", "split_type": "indomain",
                     "label": str(rng.randrange(4))})
    return docs


def _arc(n: int, seed: int) -> list[dict]:
    s, rng = _sentences(5 * n, seed), random.Random(seed)
    return [{"id": f"Mercury_{i}", "question": s[5 * i] + "?",
             "choices": {"text": [w.split(" ", 1)[0] + " " + w.split(" ", 2)[1] for w in s[5 * i + 1 : 5 * i + 5]],
                         "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[rng.randrange(4)]} for i in range(n)]


def _gsm8k(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        out.append({"question": f"What is {a} plus {b}", "answer": f"The sum is {a}+{b}={a + b}.\n#### {a + b}"})
    return out


def _jsonl(path: Path, docs: list[dict]) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def write_tasks(root: Path, n: int = 8, words: tuple[int, int] = (6, 12)) -> Path:
    """Datasets and YAMLs for TASKS under root (`n` documents a split; HellaSwag's context and endings
    `words` long); returns the YAML directory (for --include-path)."""
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent
    data, yamls = root / "data", root / "tasks"
    data.mkdir(parents=True, exist_ok=True)
    yamls.mkdir(parents=True, exist_ok=True)
    docs = {
        "tiny_hellaswag": ("hellaswag/hellaswag.yaml", {"train": _hellaswag(n, 1, words),
                                                         "validation": _hellaswag(n, 2, words)}, {}),
        "tiny_arc_easy": ("arc/arc_easy.yaml", {"train": _arc(n, 3), "validation": _arc(n, 4), "test": _arc(n, 5)}, {}),
        "tiny_lambada": ("lambada/lambada_openai.yaml", {"test": [{"text": t} for t in _sentences(n, 6)]}, {}),
        "tiny_wikitext": ("wikitext/wikitext.yaml", {s: [{"page": " ".join(_sentences(12, seed + k))} for k in range(3)]
                                                     for s, seed in (("train", 7), ("validation", 8), ("test", 9))}, {}),
        "tiny_gsm8k": ("gsm8k/gsm8k.yaml", {"train": _gsm8k(n, 10), "test": _gsm8k(n, 11)},
                       {"num_fewshot": 0, "generation_kwargs": {"until": ["Question:", "\n\n"], "do_sample": False,
                                                                "temperature": 0.0, "max_gen_toks": 12}}),
    }
    for task, (base, splits, extra) in docs.items():
        files = {split: _jsonl(data / f"{task}-{split}.jsonl", rows) for split, rows in splits.items()}
        cfg = {"include": str(builtin / base), "task": task, "tag": [], "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": files}, **extra}
        (yamls / f"{task}.yaml").write_text(json.dumps(cfg, indent=1), encoding="utf-8")  # JSON is YAML
    return yamls
