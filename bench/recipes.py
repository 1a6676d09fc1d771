"""Is the default recipe a good default beyond the character-level race? Judge it downstream.

    python bench/recipes.py --text ../shared/data/tinyshakespeare.txt --steps 300 --seeds 2

The recipe (src/scratchgpt/recipes/default.yaml, what `train` uses without --config) was tuned
on the char-level race. Here both contenders pretrain on BPE text, then fine-tune:

  recipe  `scratchgpt train` as a user runs it (the recipe), the sizes and steps below pinned
  plain   `scratchgpt train --config plain.yaml`: the dataclass defaults, the same sizes pinned

Same sizes means the same n_layer, n_embd, block_size, batch_size and steps; everything else is
each contender's own (head count, MLP width, optimizer, schedule ...). Downstream, built from the
same public-domain text (its first 90% for training, the last 10% held out, as in pretraining):

  classify  is this line as written, or its words shuffled? (binary; a syntax probe like CoLA;
            lower-cased, punctuation removed, so word order is the only cue)
            `finetune classify` of the whole model, accuracy on held-out lines
  sft       given one line of a speech, answer with the next (`finetune sft`, loss on responses)
            best val loss on held-out pairs

and the base's own val loss (whole val split). Prints a table per seed and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def scratchgpt(*args: str, log: Path) -> None:
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "scratchgpt", *args], stdout=f, stderr=subprocess.STDOUT, env=ENV)
    if p.returncode:
        raise SystemExit(f"scratchgpt {' '.join(args)} failed:\n{log.read_text()[-2000:]}")


def speeches(text: str) -> list[list[str]]:
    """The speeches of a play in nanoGPT's shakespeare format: 'NAME:' then its lines, blank-line separated."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append([ln for ln in lines[1:] if ln])
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_tasks(text: str, work: Path, n_cls: int, n_sft: int, seed: int = 0) -> dict[str, Path]:
    """classify and sft files, train from the first 90% of the text, val from the last 10%."""
    rng = random.Random(seed)
    cut = int(len(text) * 0.9)
    files = {}
    for split, part, n_c, n_s in (("train", text[:cut], n_cls, n_sft), ("val", text[cut:], n_cls // 4, n_sft // 4)):
        sp = speeches(part)
        # lower case, no punctuation: word order is the only cue (a capital or a full stop would give it away)
        lines = [" ".join(re.sub(r"[^\w\s']", " ", ln).lower().split()) for s in sp for ln in s]
        lines = [ln for ln in lines if len(ln.split()) >= 6]
        rng.shuffle(lines)
        cls = []
        for i, ln in enumerate(lines[:n_c]):
            words = ln.split()
            if i % 2:
                while words == ln.split():
                    rng.shuffle(words)
            cls.append({"text": " ".join(words), "label": "shuffled" if i % 2 else "as written"})
        pairs = [{"prompt": a, "response": b} for s in sp for a, b in zip(s, s[1:])]
        rng.shuffle(pairs)
        write_jsonl(work / f"cls_{split}.jsonl", cls)
        write_jsonl(work / f"sft_{split}.jsonl", pairs[:n_s])
        files[f"cls_{split}"], files[f"sft_{split}"] = work / f"cls_{split}.jsonl", work / f"sft_{split}.jsonl"
    return files


def pretrain(name: str, data: Path, work: Path, a: argparse.Namespace, seed: int) -> dict:
    sizes = {"model.n_layer": a.n_layer, "model.n_embd": a.n_embd, "model.block_size": a.block_size,
             "train.batch_size": a.batch_size, "train.max_iters": a.steps, "train.seed": seed}
    args = ["train", "--data", str(data), "--out", str(work / f"{name}-{seed}"), "--force",
            "--train.progress", "false", "--train.sample_tokens", "0", "--train.plot", "false",
            "--train.final_eval", "true"]
    if name == "plain":
        plain = work / "plain.yaml"
        plain.write_text("train: {}\n")  # a --config replaces the recipe: the dataclass defaults apply
        args += ["--config", str(plain)]
    for k, v in sizes.items():
        args += [f"--{k}", str(v)]
    if name == "recipe":
        args += shlex.split(a.recipe_args)
    scratchgpt(*args, log=work / f"{name}-{seed}.log")
    res = json.loads((work / f"{name}-{seed}" / "result.json").read_text())
    return {"val_loss": res.get("final_val_loss"), "run": work / f"{name}-{seed}"}


def finetune(kind: str, base: Path, files: dict, work: Path, a: argparse.Namespace) -> dict:
    out = work / f"{base.name}-{kind}"
    key = "cls" if kind == "classify" else "sft"
    scratchgpt("finetune", kind, str(base), "--train", str(files[f"{key}_train"]), "--val", str(files[f"{key}_val"]),
               "--out", str(out), "--force", "--max-steps", str(a.ft_steps), "--eval-interval", str(a.ft_steps // 4),
               log=work / f"{out.name}.log")
    return json.loads((out / "result.json").read_text())["best"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps, both contenders")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=1, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--ft-steps", type=int, default=200, help="fine-tuning steps of each task")
    ap.add_argument("--n-cls", type=int, default=2000, help="classification training lines (val: a quarter)")
    ap.add_argument("--n-sft", type=int, default=2000, help="sft training pairs (val: a quarter)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--contenders", nargs="+", choices=["recipe", "plain"], default=["recipe", "plain"])
    ap.add_argument("--recipe-args", default="", help="extra `train` flags for the recipe (a variant to judge)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    text = a.text.read_text(encoding="utf-8")
    data = work / "data"
    scratchgpt("prepare", str(a.text), "--out", str(data), "--tokenizer", "bpe", "--vocab-size", str(a.vocab_size),
               "--force", log=work / "prepare.log")
    files = build_tasks(text, work, a.n_cls, a.n_sft)
    rows = []
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        for name in a.contenders:
            base = pretrain(name, data, work, a, seed)
            cls = finetune("classify", base["run"], files, work, a)
            sft = finetune("sft", base["run"], files, work, a)
            rows.append({"seed": seed, "contender": name, "pretrain_val_loss": base["val_loss"],
                         "classify_accuracy": cls["accuracy"], "sft_val_loss": sft["val_loss"]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nBPE {a.vocab_size}, {a.n_layer}L/{a.n_embd}, context {a.block_size}, batch {a.batch_size}, "
          f"{a.steps} pretraining steps, {a.ft_steps} fine-tuning steps per task; work dir {work}\n")
    print("| contender | pretrain val loss | classify accuracy | sft val loss |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['contender']} (seed {r['seed']}) | {r['pretrain_val_loss']:.4f} | {r['classify_accuracy']:.4f} | "
              f"{r['sft_val_loss']:.4f} |")
    for name in a.contenders:
        mine = [r for r in rows if r["contender"] == name]
        print(f"| **{name} median** | {statistics.median(r['pretrain_val_loss'] for r in mine):.4f} | "
              f"{statistics.median(r['classify_accuracy'] for r in mine):.4f} | "
              f"{statistics.median(r['sft_val_loss'] for r in mine):.4f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
