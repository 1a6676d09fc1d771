"""llama.cpp's decoding speed on GGUF files, through llama-cpp-python (bench/build_llamacpp.sh builds it).

For each file: a `--prompt-tokens` prompt, then `--new-tokens` greedy tokens one at a time on `--threads`
threads, best of `--repeats`; tokens/s of the decoding alone (the prompt's time left out), and the weight
bytes that moves per second (the file's tensor bytes x tokens/s), to set beside bench/membw.py's ceiling.
Weights are loaded without repacking (use_extra_bufts=False, llama-cli --no-repack): the AMX repacking of a
native build crashed in this VM (bench/build_llamacpp.sh).

    python bench/llamacpp_decode.py smollm2-f16.gguf smollm2-q8_0.gguf SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def load(path: Path, threads: int, n_ctx: int, repack: bool = False):
    import llama_cpp

    params = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        p = params()
        p.use_extra_bufts = repack
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, verbose=False, seed=0)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = params


def weight_bytes(path: Path) -> int:
    """The file's tensor bytes: what one decoded token reads (a tied model's token_embd is its output matrix too)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def decode_seconds(llm, prompt: list[int], new: int, tokens: list[int] | None = None) -> float:
    """Seconds for `new` greedy one-token steps after the prompt's (untimed) evaluation; the ids go to `tokens`."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    t = time.perf_counter()
    for _ in range(new):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))  # greedy, as ours
        if tokens is not None:
            tokens.append(tok)
        llm.eval([tok])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--repack", action="store_true", help="let llama.cpp repack weights (AMX / AVX-512 layouts)")
    a = ap.parse_args()
    for path in a.files:
        weights = weight_bytes(path)
        llm = load(path, a.threads, a.prompt_tokens + a.new_tokens + 8, a.repack)
        prompt = llm.tokenize(b"The history of the city begins " * 8, add_bos=False)[: a.prompt_tokens]
        best = min(decode_seconds(llm, prompt, a.new_tokens) for _ in range(a.repeats))
        tps = a.new_tokens / best
        print(json.dumps({"file": path.name, "threads": a.threads, "repack": a.repack, "tokens_per_s": round(tps, 1),
                          "weight_MB": round(weights / 1e6, 1), "weights_GBps": round(weights * tps / 1e9, 2)}))


if __name__ == "__main__":
    main()
