"""The output head + cross-entropy, forward and backward: logits for the whole batch (what GPT.forward
does) vs torch's chunked `F.linear_cross_entropy` (torch >= 2.13), which never holds the (tokens x vocab)
logits. Runs alternate; medians of --rounds.

    python bench/loss_chunks.py                                  # GPT-2 vocabulary, 2048 tokens of width 384, CPU
    python bench/loss_chunks.py --device cuda --dtype bfloat16 --tokens 16384 --width 768
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    if not hasattr(F, "linear_cross_entropy"):
        raise SystemExit(f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)")
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(a.tokens, a.width, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(a.vocab, a.width, generator=g, device=device) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, a.vocab, (a.tokens,), generator=g, device=device)
    options = torch.nn.LinearCrossEntropyOptions()
    ways = {"whole logits": lambda: F.cross_entropy(F.linear(x, w).float(), t),
            "chunked": lambda: F.linear_cross_entropy(x, w, t, options=options)}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {k: [] for k in ways}
    grads = {}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            x.grad = w.grad = None
            sync()
            t0 = time.perf_counter()
            loss = ways[name]()
            loss.backward()
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
            grads[name] = (loss.item(), x.grad.float().norm().item(), w.grad.float().norm().item())
    print(f"torch {torch.__version__}, {a.device} {a.dtype}, {a.tokens} tokens x width {a.width} -> vocab {a.vocab}, "
          f"{torch.get_num_threads()} threads, median of {a.rounds}")
    base = statistics.median(times["whole logits"])
    for name, ts in times.items():
        loss, gx, gw = grads[name]
        print(f"{name:>13}: {statistics.median(ts) * 1e3:8.1f} ms ({base / statistics.median(ts):.2f}x)  "
              f"loss {loss:.6f}  |dx| {gx:.6g}  |dW| {gw:.6g}")


if __name__ == "__main__":
    main()
