"""Where a training step's time goes at nanoGPT's README CPU shape (4x128, batch 12 x 64), in one process.

    python bench/step_anatomy.py --nanogpt /path/to/nanoGPT --rounds 10

Every section alternates its variants round by round (A B, B A, ...) on the same fixed batch, so
machine drift hits all variants alike; figures are medians over rounds. Data loading is outside.

  phases   nanoGPT's GPT + its own configure_optimizers() and clip, vs ours at the same
           architecture (configs/shakespeare-char-nanogpt.yaml): ms of forward, backward, clip,
           optimizer step and zero_grad
  manual   our model through autograd, vs the same blocks through one hand-written
           autograd.Function per block (forward and backward written out with aten ops:
           ~24 kernels per block, no per-op autograd nodes, residual adds folded into addmm)
  threads  one batch of 12 on 2 OpenMP threads, vs two halves of 6 on two Python threads with
           1 OpenMP thread each (gradients accumulate into the same .grad)
  clip     our step with clipping as now (norm, then scale every grad), vs the norm alone with the
           clip factor handed to fused AdamW as its grad_scale (one pass over the grads fewer)
  gemm     GFLOP/s of the step's matmul shapes (forward, grad-input, grad-weight) at 1 and 2
           threads, against a 2048^3 matmul

glibc keeps freed memory here for every variant (scratchgpt.train.keep_freed_memory), so the
phases section compares the model and optimizer code only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scratchgpt import distributed as dist  # noqa: E402
from scratchgpt.model import GPT, ModelConfig  # noqa: E402
from scratchgpt.optim import OptimConfig, build_optimizer
from scratchgpt.runtime import configure_threads, keep_freed_memory  # noqa: E402

aten = torch.ops.aten
SHAPE = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
BATCH = 12


def alternate(variants: dict[str, Callable[[], None]], rounds: int, steps: int) -> dict[str, list[float]]:
    """ms per call of each variant, one figure per round; the order flips every round."""
    for f in variants.values():
        for _ in range(steps):
            f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            t = time.perf_counter()
            for _ in range(steps):
                variants[k]()
            times[k].append((time.perf_counter() - t) / steps * 1000)
    return times


def report(times: dict[str, list[float]]) -> None:
    base = next(iter(times))
    for k, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(times[base], ts))
        print(f"| {k} | {statistics.median(ts):.2f} | {ratio:.3f} |")


def our_model() -> tuple[GPT, list]:
    torch.manual_seed(0)
    net = GPT(ModelConfig(**SHAPE))
    ocfg = OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0)
    return net, build_optimizer(net, ocfg, torch.device("cpu"))


def phases(nanogpt: Path, x: torch.Tensor, y: torch.Tensor, rounds: int) -> None:
    sys.path.insert(0, str(nanogpt))
    from model import GPT as NanoGPT, GPTConfig  # nanoGPT's model.py

    torch.manual_seed(0)
    ng = NanoGPT(GPTConfig(**SHAPE))
    ng_opt = ng.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    net, opts = our_model()
    sides = {
        "nanoGPT": (lambda: ng(x, y)[1], lambda: torch.nn.utils.clip_grad_norm_(ng.parameters(), 1.0), [ng_opt]),
        "ours": (lambda: net(x, y)[1], lambda: dist.clip_grad_norm(net, 1.0), opts),
    }
    parts: dict[str, dict[str, list[float]]] = {s: {p: [] for p in ("forward", "backward", "clip", "step", "zero_grad")}
                                                for s in sides}
    for r in range(rounds + 1):
        for s in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            fwd, clip, optimizers = sides[s]
            acc = {p: 0.0 for p in parts[s]}
            for _ in range(20):
                t0 = time.perf_counter()
                loss = fwd()
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                clip()
                t3 = time.perf_counter()
                for o in optimizers:
                    o.step()
                t4 = time.perf_counter()
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                t5 = time.perf_counter()
                for p, d in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    acc[p] += d * 1000 / 20
            if r:  # round 0 warms up
                for p in acc:
                    parts[s][p].append(acc[p])
    print("\n## phases (ms per step, median)\n\n| | " + " | ".join(parts["ours"]) + " | total |")
    print("|---" * (len(parts["ours"]) + 2) + "|")
    for s in sides:
        med = {p: statistics.median(v) for p, v in parts[s].items()}
        print(f"| {s} | " + " | ".join(f"{m:.2f}" for m in med.values()) + f" | {sum(med.values()):.2f} |")


class _Block(torch.autograd.Function):
    """One pre-LN block (LayerNorm without bias, causal attention, GELU MLP, no biases) written out."""

    @staticmethod
    def forward(ctx, x, w1, wqkv, wo, w2, wfc, wp, n_head: int, eps: float):
        B, T, C = x.shape
        D = C // n_head
        x2d = x.reshape(B * T, C)
        a, m1, r1 = aten.native_layer_norm(x2d, [C], w1, None, eps)
        qkv = torch.mm(a, wqkv.t())
        q, k, v = qkv.view(B, T, 3, n_head, D).permute(2, 0, 3, 1, 4)
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        att = o.transpose(1, 2).reshape(B * T, C)
        x2 = torch.addmm(x2d, att, wo.t())
        b, m2, r2 = aten.native_layer_norm(x2, [C], w2, None, eps)
        h = torch.mm(b, wfc.t())
        g = F.gelu(h)
        ctx.save_for_backward(x2d, w1, wqkv, wo, w2, wfc, wp, a, m1, r1, qkv, o, lse, att, x2, b, m2, r2, h, g)
        ctx.dims = (B, T, C, n_head, D)
        return torch.addmm(x2, g, wp.t()).view(B, T, C)

    @staticmethod
    def backward(ctx, dout):
        x2d, w1, wqkv, wo, w2, wfc, wp, a, m1, r1, qkv, o, lse, att, x2, b, m2, r2, h, g = ctx.saved_tensors
        B, T, C, H, D = ctx.dims
        d3 = dout.reshape(B * T, C)
        dh = aten.gelu_backward(torch.mm(d3, wp), h)
        db, dw2, _ = aten.native_layer_norm_backward(torch.mm(dh, wfc), x2, [C], m2, r2, w2, None, [True, True, False])
        d2 = db.add_(d3)
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        datt = torch.mm(d2, wo).view(B, T, H, D).transpose(1, 2)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(datt, q, k, v, o, lse, 0.0, True)
        dqkv = torch.stack([dq, dk, dv], 0).permute(1, 3, 0, 2, 4).reshape(B * T, 3 * C)
        da, dw1, _ = aten.native_layer_norm_backward(torch.mm(dqkv, wqkv), x2d, [C], m1, r1, w1, None, [True, True, False])
        dx = da.add_(d2).view(B, T, C)
        return (dx, dw1, torch.mm(dqkv.t(), a), torch.mm(d2.t(), att), dw2, torch.mm(dh.t(), b), torch.mm(d3.t(), g),
                None, None)


def manual_loss(net: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    t = net.transformer
    h = t.wte(x) + t.wpe(torch.arange(x.size(1)))
    for blk in t.h:
        h = _Block.apply(h, blk.ln_1.weight, blk.attn.c_attn.weight, blk.attn.c_proj.weight, blk.ln_2.weight,
                         blk.mlp.c_fc.weight, blk.mlp.c_proj.weight, net.cfg.n_head, blk.ln_1.eps)
    logits = net.lm_head(t.ln_f(h))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def manual(x: torch.Tensor, y: torch.Tensor, rounds: int) -> None:
    net, _ = our_model()
    grads = []
    for f in (lambda: net(x, y)[1], lambda: manual_loss(net, x, y)):
        net.zero_grad(set_to_none=True)
        f().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads))
    step = {"autograd": lambda: net(x, y)[1].backward(), "hand-written block backward": lambda: manual_loss(net, x, y).backward()}
    print(f"\n## manual (forward + backward, ms; gradients agree to {err:.1e} relative)\n\n| | ms | speed vs autograd |\n|---|---|---|")
    report(alternate(step, rounds, 20))


def threads(x: torch.Tensor, y: torch.Tensor, rounds: int) -> None:
    net, _ = our_model()
    go, done = threading.Semaphore(0), threading.Semaphore(0)
    half = x.size(0) // 2

    def worker() -> None:
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        while True:
            go.acquire()
            (net(x[half:], y[half:])[1] * 0.5).backward()
            done.release()

    threading.Thread(target=worker, daemon=True).start()

    def two_halves() -> None:
        torch.set_num_threads(1)
        go.release()
        (net(x[:half], y[:half])[1] * 0.5).backward()
        done.acquire()
        torch.set_num_threads(2)
        net.zero_grad(set_to_none=True)

    def one_batch() -> None:
        net(x, y)[1].backward()
        net.zero_grad(set_to_none=True)

    print("\n## threads (forward + backward, ms)\n\n| | ms | speed vs one batch |\n|---|---|---|")
    report(alternate({"batch 12, 2 OpenMP threads": one_batch, "2 x batch 6, 2 Python threads x 1": two_halves}, rounds, 20))


def clip(x: torch.Tensor, y: torch.Tensor, rounds: int) -> None:
    (net_a, opts_a), (net_b, opts_b) = our_model(), our_model()

    def scaled() -> None:
        net_a(x, y)[1].backward()
        dist.clip_grad_norm(net_a, 1.0)
        for o in opts_a:
            o.step()
            o.zero_grad(set_to_none=True)

    def folded() -> None:
        net_b(x, y)[1].backward()
        grads = [p.grad for p in net_b.parameters() if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        for o in opts_b:
            o.grad_scale = torch.clamp(total + 1e-6, min=1.0)  # fused AdamW divides every grad by it
            o.step()
            o.zero_grad(set_to_none=True)

    for _ in range(3):
        scaled(), folded()
    err = max((a - b).abs().max().item() for a, b in zip(net_a.parameters(), net_b.parameters()))
    print(f"\n## clip (whole step, ms; weights after 3 steps differ by {err:.1e})\n\n| | ms | speed vs now |\n|---|---|---|")
    report(alternate({"clip, then AdamW": scaled, "clip folded into fused AdamW": folded}, rounds, 20))


def gemm() -> None:
    def rate(a: torch.Tensor, b: torch.Tensor, n: int = 100) -> float:
        for _ in range(10):
            torch.mm(a, b)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                torch.mm(a, b)
            ts.append((time.perf_counter() - t) / n)
        return 2 * a.size(0) * a.size(1) * b.size(1) / statistics.median(ts) / 1e9

    m = BATCH * SHAPE["block_size"]
    print("\n## gemm (GFLOP/s)\n\n| shape (M x K x N) | 1 thread | 2 threads |\n|---|---|---|")
    c = SHAPE["n_embd"]
    for k, n in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)):
        for name, (a, b) in (("forward", (torch.randn(m, k), torch.randn(k, n))),
                             ("grad input", (torch.randn(m, n), torch.randn(n, k))),
                             ("grad weight", (torch.randn(n, m), torch.randn(m, k)))):
            r = []
            for t in (1, 2):
                torch.set_num_threads(t)
                r.append(rate(a, b))
            print(f"| {name} {a.size(0)} x {a.size(1)} x {b.size(1)} | {r[0]:.0f} | {r[1]:.0f} |")
    big = torch.randn(2048, 2048)
    r = []
    for t in (1, 2):
        torch.set_num_threads(t)
        r.append(rate(big, big, 5))
    print(f"| 2048 x 2048 x 2048 | {r[0]:.0f} | {r[1]:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, help="a checkout of karpathy/nanoGPT (its model.py is imported)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sections", nargs="+", default=["phases", "manual", "threads", "clip", "gemm"])
    a = ap.parse_args()
    configure_threads(2)
    keep_freed_memory()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["block_size"]), generator=g)
    y = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["block_size"]), generator=g)
    if "phases" in a.sections:
        phases(Path(a.nanogpt).resolve(), x, y, a.rounds)
    if "manual" in a.sections:
        manual(x, y, a.rounds)
    if "threads" in a.sections:
        threads(x, y, a.rounds)
    if "clip" in a.sections:
        clip(x, y, a.rounds)
    if "gemm" in a.sections:
        gemm()


if __name__ == "__main__":
    main()
