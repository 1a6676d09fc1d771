"""Generation speed: scratchgpt vs Hugging Face `generate` vs nanoGPT's sample.py loop.

Batch 1, N new tokens (default 500) from a short prompt, fp32 on CPU, sampling with
temperature 0.8 and top-k 200 (nanoGPT sample.py's defaults) for every contender. All three
run the same architecture with the same weights (ours copied into GPT2LMHeadModel and into
nanoGPT's GPT), so the greedy check at the start also shows the three models agree.
Contenders are interleaved (A, B, C, A, B, C, ...) because the machine may be shared; the
table reports median and best tokens/s (wall clock) and our speed-up over each: the median
of per-round ratios, best against best, and by process CPU time (steadier when other jobs
compete for the cores; with one thread the fairest figure, with more it counts spinning).

    python bench/generate.py --nanogpt /tmp/nanogpt            # both model sizes
    python bench/generate.py --models small --runs 5
    python bench/generate.py --models gpt2 --quantize int8 int4   # adds scratchgpt with int8 / int4 weights
    python bench/generate.py --models small --utf8-guard --no-hf --runs 9   # the UTF-8 guard's cost, A/B
    python bench/generate.py --models smollm2 --threads 2 --runs 5   # the real SmolLM2-135M vs HF and llama.cpp

`--models smollm2` is its own mode (bench/generate_smollm2.py): the released SmolLM2-135M-Instruct, greedy, a
32-token prompt and 256 new tokens by default, ours in fp32 / int8 / int4 / bf16 against HF `generate` fp32 and
llama.cpp on GGUF F16 / Q8_0 / Q4_1 of the same weights, with each one's weight GB/s as a fraction of the
machine's memory bandwidth, and the time to first token of a fresh `scratchgpt sample`.

With --quantize int8 (or int4) another contender runs our decoder on a copy whose Linear layers
hold int8 (int4) weights (`scratchgpt sample --quantize int8`); the others stay fp32. Its greedy tokens
are compared with the fp32 model's, and its speed-ups are given against every contender.

With --utf8-guard, scratchgpt runs twice per round, with a byte-level vocabulary of the model's size (ByteVocab)
and the UTF-8 guard off ("scratchgpt") and on ("scratchgpt utf8-guard"): the guard's cost is the second's
median per-round time ratio (its "speed-up over" the first, below 1).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import generate_smollm2
from scratchgpt.generate import GenerationConfig, generate_tokens
from scratchgpt.model import GPT, ModelConfig
from scratchgpt.quantize import quantize_model

MODELS = {
    # ~10M parameters: the project's small default shape, with a context that holds 500 new tokens
    "small": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=4096, block_size=1024),
    # GPT-2 124M
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024),
}
TEMPERATURE, TOP_K = 0.8, 200


def ours(shape: dict) -> GPT:
    cfg = ModelConfig(**shape, pos="learned", mlp="gelu", norm="layernorm", norm_placement="pre", tie_embeddings=True, bias=True)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def hf_copy(model: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.cfg
    hf_cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        # HF's Conv1D stores (in, out): the transpose of nn.Linear
        if any(k.endswith(f"{n}.weight") for n in ("c_attn", "c_proj", "c_fc")):
            v = v.t().contiguous()
        sd[k] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def nanogpt_copy(model: GPT, path: Path):
    sys.path.insert(0, str(path))
    try:
        import model as nano  # nanoGPT's model.py
    finally:
        sys.path.pop(0)
    c = model.cfg
    ng = nano.GPT(nano.GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                                 n_embd=c.n_embd, dropout=0.0, bias=True))
    ng.load_state_dict(model.state_dict())
    return ng.eval()


def run_ours(model, prompt, n, seed):
    return generate_tokens(model, [prompt], GenerationConfig(max_new_tokens=n, temperature=TEMPERATURE, top_k=TOP_K, seed=seed, stop_tokens=()))[0]


class ByteVocab:
    """A byte-level vocabulary of `size` tokens, as generate_tokens reads a tokenizer (vocab_size and the bytes of
    each token): the 256 bytes, then English words and CJK characters, whole or cut inside a character, as BPE
    learns them. The guard's per-step cost depends on the vocabulary's size only, not on its tokens."""

    def __init__(self, size: int) -> None:
        rng = random.Random(0)
        table = [bytes([b]) for b in range(256)]
        while len(table) < size:
            if rng.random() < 0.6:
                table.append((" " + "".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 8)))).encode())
            else:
                ch = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 2))).encode()
                table.append(ch[: rng.choice([len(ch), 1, 2, 4, 5])])
        self.table, self.vocab_size = table[:size], size

    def token_bytes_table(self) -> list[bytes]:
        return self.table


def ours_with_vocab(vocab: ByteVocab, guard: bool):
    def run(model, prompt, n, seed):
        gen = GenerationConfig(max_new_tokens=n, temperature=TEMPERATURE, top_k=TOP_K, seed=seed, stop_tokens=(),
                               utf8_guard=guard)
        return generate_tokens(model, [prompt], gen, tokenizer=vocab)[0]
    return run


def run_hf(model, prompt, n, seed):
    torch.manual_seed(seed)
    x = torch.tensor([prompt])
    with torch.inference_mode():
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=True,
                           temperature=TEMPERATURE, top_k=TOP_K, top_p=1.0, pad_token_id=0)
    return y[0, len(prompt):].tolist()


def run_nanogpt(model, prompt, n, seed):
    torch.manual_seed(seed)  # exactly sample.py: torch.no_grad() around model.generate
    with torch.no_grad():
        y = model.generate(torch.tensor([prompt]), n, temperature=TEMPERATURE, top_k=TOP_K)
    return y[0, len(prompt):].tolist()


def greedy_check(name, ours_model, others, prompt):
    """Same weights, same architecture: the first greedy tokens should agree across contenders."""
    n = 8
    ref = generate_tokens(ours_model, [prompt], max_new_tokens=n, temperature=0, stop_tokens=())[0]
    with torch.inference_mode():
        for label, m in others.items():
            x = torch.tensor([prompt])
            if label == "hf":
                got = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            else:
                got = m.generate(x, n, temperature=1.0, top_k=1)
            got = got[0, len(prompt):].tolist()
            print(f"  greedy check {name} vs {label}: {'ok' if got == ref else f'DIFFERENT {got} vs {ref}'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small,gpt2", help="comma list of: " + ",".join(MODELS) + "; or smollm2 alone")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 500 (smollm2: 256)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 8 (smollm2: 32)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per contender (median reported)")
    ap.add_argument("--nanogpt-runs", type=int, default=0, help="timed nanoGPT runs (default: --runs); it is slow at 124M")
    ap.add_argument("--nanogpt", type=Path, default=None, help="path to a nanoGPT checkout (its model.py)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--quantize", nargs="+", choices=["none", "int8", "int4", "bf16"], default=["none"],
                    help="also run ours with these weight formats")
    ap.add_argument("--utf8-guard", action="store_true",
                    help="run ours with a byte-level vocabulary, UTF-8 guard off and on (its cost, paired A/B)")
    generate_smollm2.add_arguments(ap)
    a = ap.parse_args()
    if a.models == "smollm2":
        a.new_tokens, a.prompt_tokens = a.new_tokens or 256, a.prompt_tokens or 32
        if a.quantize == ["none"]:
            a.quantize = ["int8", "int4"]
        return generate_smollm2.main(a)
    if "smollm2" in a.models.split(","):
        ap.error("--models smollm2 runs alone")
    a.new_tokens, a.prompt_tokens = a.new_tokens or 500, a.prompt_tokens or 8
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, batch 1, {a.new_tokens} new tokens, "
          f"temperature {TEMPERATURE}, top-k {TOP_K}", flush=True)
    rows = []
    for name in a.models.split(","):
        model = ours(MODELS[name])
        contenders = {"scratchgpt": (run_ours, model)}
        if a.utf8_guard:
            vocab = ByteVocab(model.cfg.vocab_size)
            contenders = {"scratchgpt": (ours_with_vocab(vocab, False), model),
                          "scratchgpt utf8-guard": (ours_with_vocab(vocab, True), model)}
        quantized = {}
        for q in a.quantize:
            if q != "none":
                quantized[q] = quantize_model(copy.deepcopy(model), q)
                contenders[f"scratchgpt {q}"] = (run_ours, quantized[q])
        if not a.no_hf:
            import transformers

            contenders[f"HF transformers {transformers.__version__}"] = (run_hf, hf_copy(model))
        if a.nanogpt:
            contenders["nanoGPT sample.py"] = (run_nanogpt, nanogpt_copy(model, a.nanogpt))
        print(f"{name}: {model.num_params() / 1e6:.1f}M parameters, {MODELS[name]}", flush=True)
        prompt = torch.randint(0, model.cfg.vocab_size, (a.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        greedy_check(name, model, {("hf" if k.startswith("HF") else "nanogpt"): m for k, (_, m) in contenders.items()
                                   if not k.startswith("scratchgpt")}, prompt)
        for q, qmodel in quantized.items():
            n_check = 32
            ref = generate_tokens(model, [prompt], max_new_tokens=n_check, temperature=0, stop_tokens=())[0]
            got = generate_tokens(qmodel, [prompt], max_new_tokens=n_check, temperature=0, stop_tokens=())[0]
            same = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), n_check)
            print(f"  greedy {q} vs fp32: first {same} of {n_check} tokens identical", flush=True)
        for label, (fn, m) in contenders.items():  # warm-up: thread pools, allocator, first-call paths
            fn(m, prompt, 16, 0)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        cpu: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(a.runs):
            for label, (fn, m) in contenders.items():
                if label.startswith("nanoGPT") and r >= (a.nanogpt_runs or a.runs):
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn(m, prompt, a.new_tokens, 1000 + r)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                assert len(out) == a.new_tokens, (label, len(out))
                times[label].append(dt)
                cpu[label].append(dc)
                print(f"  run {r + 1} {label}: {a.new_tokens / dt:.1f} tok/s ({a.new_tokens / dc:.1f} per CPU second)", flush=True)
        ours_labels = [k for k in times if k.startswith("scratchgpt")]
        for label in times:
            ts, cs = times[label], cpu[label]
            # ratios within a round (contenders ran back to back) cancel most of the drift in machine load
            ups = []
            for ours_label in ours_labels:
                ot, oc = times[ours_label], cpu[ours_label]
                ups.append((statistics.median(t / ot[i] for i, t in enumerate(ts)),
                            statistics.median(c / oc[i] for i, c in enumerate(cs))))
            rows.append((name, label, len(ts), a.new_tokens / statistics.median(ts), a.new_tokens / min(ts), ups))
    print()
    heads = [f"{o} speed-up over it (median of rounds / CPU time)" for o in ours_labels]
    print("| model | implementation | runs | median tok/s | best tok/s | " + " | ".join(heads) + " |")
    print("|---|---|---|---|---|" + "---|" * len(heads))
    for name, label, n, med, best, ups in rows:
        cells = " | ".join(f"{w:.2f}x / {c:.2f}x" for w, c in ups)
        print(f"| {name} | {label} | {n} | {med:.1f} | {best:.1f} | {cells} |")


if __name__ == "__main__":
    main()
