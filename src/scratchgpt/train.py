"""Training (`scratchgpt train`): setup, the loop, evaluate-and-save, teardown (the config and the plan checked
before anything changes on disk are train_plan.py's).

The loop (`loop`) does the same things in the same order every step: batch, forward,
backward, clip, finite-check, step, schedule, log, eval, save. Batches are a pure function of
(seed, step) (shuffle: of the seed and the windows drawn before), so a resumed run, or one on a different
number of ranks, sees the same data.
Setup (`setup`) builds everything the loop touches into one `Session`; `finish` writes the
result and tears down.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from . import UserError
from . import distributed as dist
from . import kernels, numerics
from .checkpoint import (find_resumable, load_model_tensors, load_tensors, remove_stale_temps, repair_aliases, rng_state,
                         set_rng_state)
from .checkpoint.fsdp import load_optimizers, save_training_checkpoint
from .data import TokenDataset, mlm_mask_batch
from .metrics import evaluate_lm
from .model import GPT, ModelConfig
from .optim import OptimConfig, build_optimizer, check_extension, lr_at, set_lr
from .runtime import (INTERRUPTED, configure_device, configure_threads, environment,
                      exact_fp32_matmuls, keep_freed_memory, peak_flops, pick_dtype, stop_on_signals)
from .runs.files import (BEST, CONFIG_FILE, ENVIRONMENT_FILE, LATEST, MODEL_FILE, RESULT_FILE, STATE_FILE,
                         TOKENIZER_FILE)
from .runs.config import read_run_config, write_run_config
from .runs.guard import write_marker
from .runs.log import RunLog
from .runs.staging import remove_replaced
from .runs.rows import check_step
from .utils import atomic_write_json, finite_or_null, human_number, json_text, read_json
from .train_plan import (TRAIN_RANGES, Plan, RunRequest, Session, TrainConfig, check_relations,  # noqa: F401
                         check_memory, check_same_model, fit_warmup, initial_weights, plan_run, resolve_config,
                         startup_summary)


# ---------------------------------------------------------------- setup
def setup(req: RunRequest) -> Session:
    """Plan and check the run, join the process group, build data, model and optimizers, restore a
    checkpoint. Every check comes before the first change on disk."""
    p, command = plan_run(req), req.command
    out, data, model_cfg, tcfg, ocfg, resume = p.out, p.data, p.model_cfg, p.tcfg, p.ocfg, p.resume
    train_ds = TokenDataset(data, "train", model_cfg.block_size)
    val_ds = TokenDataset(data, "val", model_cfg.block_size)
    ctx = dist.setup(tcfg)  # rank, world size, device; a no-op without torchrun
    check_memory(model_cfg, p.micro, ctx)
    configure_threads(tcfg.threads)
    keep_freed_memory()
    device = ctx.device
    configure_device(device)
    dtype = pick_dtype(tcfg.dtype, device)
    command = _prepare_out(p, ctx, command)

    torch.manual_seed(tcfg.seed)
    net = GPT(model_cfg).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    if p.initial is not None:
        load_model_tensors(net, p.initial)
    restored = _restore_model(out, net, scaler, ctx) if resume else None
    if restored and (note := check_extension(out, restored[1], ocfg, tcfg.max_iters)) and ctx.rank == 0:
        print(note, file=sys.stderr)  # before anything trains: a changed schedule's LR jump
    # threads, the CPU's dtype and Newton-Schulz dtype: rank 0's, cached per machine, recorded below (a resume
    # repeats them)
    p.tcfg, p.ocfg, settled = numerics.settle(tcfg, ocfg, net, device, ctx, restored[1] if restored else None,
                                              batch=p.micro)
    tcfg, ocfg = p.tcfg, p.ocfg
    dtype = pick_dtype(tcfg.dtype, device)  # (a CPU's auto settled above: fp32 or bf16 autocast, never fp16)
    config = _write_config(p, ctx, command)
    model_for_step, optimizers = _wrap_and_optimize(net, p, ctx, restored)
    s = Session(
        **{**vars(p), "initial": None}, ctx=ctx, device=device, net=net,  # the start weights are in net now
        model_for_step=model_for_step, optimizers=optimizers, scaler=scaler,
        autocast=torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext(),
        train_ds=train_ds, val_ds=val_ds, log=RunLog(out, ctx.rank == 0, tcfg.tensorboard, tcfg.plot), config=config,
        flops_per_step=net.flops_per_token() * tcfg.batch_size * model_cfg.block_size,
        peak=peak_flops(device, dtype, tcfg.peak_flops), mask_batch=mlm_mask_batch if tcfg.objective == "mlm" else None,
        dtype=dtype, deferred_check=checks_finite_on_device(device, scaler, optimizers), settled=settled)
    if s.deferred_check:
        s.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        s.bad_steps = torch.zeros((), dtype=torch.long, device=device)
    if restored:
        _restore_counters(s, restored[1])
    if resume:
        s.log.truncate(s.step)  # rows a crash left past the checkpoint are written again, once
    if s.master:  # for the report (after a resume may have set the thread count)
        atomic_write_json(out / ENVIRONMENT_FILE, {**environment(device, dtype), "world_size": ctx.world,
                                                     "parallel": ctx.parallel, "kernels": kernels.runs_on(device)})
    s.t_start = time.time()
    return s


def _prepare_out(p: Plan, ctx: dist.DistContext, command: Optional[str]) -> Optional[str]:
    """The run directory made ready (a --force replacement removed, stale temps gone, aliases repaired on resume);
    the command to record: a resumed run keeps its own, not the resume's."""
    out = p.out
    if p.force and ctx.rank == 0 and out.exists() and not p.resume:
        remove_replaced(out)  # a run scratchgpt wrote, checked by plan_run (runs.guard)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.rank == 0:
        remove_stale_temps(out)
        write_marker(out, "run")
        if p.resume:
            repair_aliases(out, log=lambda m: print(m, file=sys.stderr))
    if p.resume and (out / CONFIG_FILE).exists():
        command = read_run_config(out).get("command", command)
    return command


def _write_config(p: Plan, ctx: dist.DistContext, command: Optional[str]) -> dict:
    """RUN/config.json (rank 0) from the settled plan; returns it."""
    config = {"format_version": 1, "data": str(p.data), "model": asdict(p.model_cfg), "train": asdict(p.tcfg),
              "optim": asdict(p.ocfg), "world_size": ctx.world, "tokenizer": p.meta.get("tokenizer")}
    if command:
        config["command"] = command
    if ctx.rank == 0:
        write_run_config(p.out, config)
    return config


def _wrap_and_optimize(net: GPT, p: Plan, ctx: dist.DistContext,
                       restored: Optional[tuple[Path, dict]]) -> tuple[torch.nn.Module, list]:
    """What the step runs (DDP / FSDP / compiled wrappers of net) and the optimizers, a checkpoint's states loaded."""
    tcfg, ocfg = p.tcfg, p.ocfg
    model_for_step = dist.wrap(net, tcfg, ctx)
    # after wrap: FSDP2 replaces the parameters with sharded ones
    optimizers = build_optimizer(net, ocfg, ctx.device, compiled=tcfg.compile)
    if restored:
        load_optimizers(restored[0], net, optimizers, restored[1], ctx)  # full or sharded, onto any world size
        numerics.apply_ns_dtype(optimizers, ocfg.ns_dtype)  # the checkpoint's groups carry theirs: the config wins
    if tcfg.compile:
        model_for_step = torch.compile(model_for_step, mode=tcfg.compile_mode)
    return model_for_step, optimizers


def _restore_counters(s: Session, state: dict) -> None:
    """A checkpoint's counters and RNG into the session (last: nothing in setup shifts the stream); its thread
    count is numerics.settle's."""
    s.step, s.tokens = state["step"], state["tokens"]
    s.best_val = state.get("best_val_loss") or float("inf")
    s.bad_evals, s.elapsed_before = state.get("bad_evals", 0), state.get("elapsed_s", 0.0)
    s.skipped = state.get("skipped_steps", 0)
    set_rng_state(state["rng"], s.device)


def _restore_model(out: Path, net: GPT, scaler, ctx) -> Optional[tuple[Path, dict]]:
    """Weights (and the loss scaler) from the newest intact checkpoint; (checkpoint, state) for the rest.
    None for a run that stopped before its first checkpoint: it starts afresh."""
    found = find_resumable(out, log=lambda m: print(m, file=sys.stderr))
    if found is None:
        if ctx.rank == 0:
            print(f"note: {out} has no checkpoint yet (it stopped before its first save): starting it afresh "
                  "with its saved config", file=sys.stderr)
        return None
    ckpt, state = found
    check_step(state.get("step"), str(ckpt / STATE_FILE))  # before anything (config.json, the logs) changes
    check_same_model(net, ckpt, out)
    load_model_tensors(net, load_tensors(ckpt / MODEL_FILE))
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ctx.rank == 0:
        print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
    return ckpt, state


# ---------------------------------------------------------------- the loop
def train(data: Optional[Path] = None, out: Optional[Path] = None, model: Optional[ModelConfig] = None,
          train: Optional[TrainConfig] = None, optim: Optional[OptimConfig] = None, resume: bool = False,
          force: bool = False, overrides: Optional[dict] = None, command: Optional[str] = None,
          on_eval: Optional[Callable[[int, float], Optional[str]]] = None) -> dict:
    """Train a GPT on a prepared data dir; returns the final metrics (also RUN/result.json).

    `overrides`: the dotted config keys the user gave (they win over a resumed run's saved config);
    `command`: the command line, recorded in config.json (the model card of `export` shows it).
    The first Ctrl-C or SIGTERM stops after the current step with a checkpoint (stop_reason
    "interrupted"; `resume` continues bit-exactly); a second one quits at once. `on_eval(step,
    val_loss)` is called on every rank after each periodic evaluation and its checkpoint; a string
    it returns stops training with that stop reason and no final eval (tune's pruner uses it)."""
    with stop_on_signals() as stop:
        s = setup(RunRequest(data, out, model, train, optim, resume, force, overrides, command))
        s.stop, s.on_eval = stop, on_eval
        if s.master:
            print(startup_summary(s), file=sys.stderr, flush=True)
        stop_reason = loop(s)
        return finish(s, stop_reason)


def loop(s: Session) -> str:
    """Step until max_iters, a stop condition or the time limit; returns why it stopped."""
    tcfg, ocfg, ctx, device = s.tcfg, s.ocfg, s.ctx, s.device
    t_last, tokens_last = time.time(), s.tokens
    bar = _progress(tcfg, s.master, s.step)
    metrics: dict = {}
    stop_reason = "max_iters"
    while s.step < tcfg.max_iters:
        dist.maybe_fail(s.step, ctx)  # test-only fault injection (SCRATCHGPT_FAULT_RANK/STEP); otherwise a no-op
        # batch + forward + backward (accumulating over micro-steps; DDP syncs only on the last)
        offsets = s.train_ds.batch_offsets(s.step, tcfg.batch_size, tcfg.seed, tcfg.sampling,
                                           start=s.tokens // s.model_cfg.block_size)[ctx.rank * s.per_rank:(ctx.rank + 1) * s.per_rank]
        loss_sum = forward_backward(s, offsets)
        # clip + finite check: a non-finite loss or gradient never reaches the weights
        for opt in s.optimizers:
            s.scaler.unscale_(opt)
        grad_norm = dist.clip_grad_norm(s.net, ocfg.grad_clip)
        finite = check_finite(s, loss_sum, grad_norm)
        if s.skipped > tcfg.max_skipped_frac * tcfg.max_iters:  # the run can no longer end within the limit
            stop_reason = "too many non-finite steps"
            break
        # step + schedule
        lr = lr_at(s.step, ocfg, tcfg.max_iters)
        set_lr(s.optimizers, lr, ocfg)
        optimizer_step(s, finite)
        s.step += 1
        s.tokens += tcfg.batch_size * s.model_cfg.block_size
        # log (the loss read here is the host sync that makes the clock honest)
        is_eval = s.step % tcfg.eval_interval == 0 or s.step == tcfg.max_iters
        if s.step % tcfg.log_interval == 0 or is_eval or s.step == 1:
            report_nonfinite(s)
            train_loss = dist.mean(loss_sum, ctx).item()
            now = time.time()
            tok_s = (s.tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, s.tokens
            metrics = {"step": s.step, "tokens": s.tokens, "elapsed_s": round(s.elapsed, 3), "lr": lr,
                       "train_loss": train_loss, "grad_norm": float(grad_norm), "tok_per_s": round(tok_s, 1),
                       "mfu": float(f"{s.peak.mfu(s.flops_per_step * tok_s / (tcfg.batch_size * s.model_cfg.block_size)):.4g}")}
            bar.update(s.step - bar.n)
            bar.set_postfix(loss=f"{train_loss:.4f}", tokens=human_number(s.tokens), tok_s=human_number(tok_s),
                            mfu=f"{metrics['mfu']:.0%}")
        # eval + save (an eval writes its metrics row itself, before its checkpoint)
        if is_eval:
            stop_reason = evaluate_and_save(s, metrics, bar.write) or stop_reason
        elif metrics.get("step") == s.step:
            s.log.write(metrics)
        if stop_reason == "max_iters" and s.step < tcfg.max_iters:
            stop_reason = _stop_now(s) or stop_reason
            if stop_reason != "max_iters" and not is_eval:
                save(s, is_best=False)
        if stop_reason != "max_iters":
            break
    bar.close()
    return stop_reason


def forward_backward(s: Session, offsets) -> torch.Tensor:
    """This rank's share of one step's batch, forward and backward over its micro-steps (DDP syncs only on the
    last); the mean loss, on the device."""
    loss_sum = torch.zeros((), device=s.device)
    for k in range(s.accum):
        x, y = micro_batch(s, offsets[k * s.micro:(k + 1) * s.micro], k)
        with dist.no_sync(s.model_for_step, last=(k == s.accum - 1)), s.autocast:
            _, loss = s.model_for_step(x, y)
        s.scaler.scale(loss / s.accum).backward()
        loss_sum += loss.detach() / s.accum
    return loss_sum


def optimizer_step(s: Session, finite: bool) -> None:
    """Apply the gradients (unless a non-finite one was found) and clear them."""
    if finite:
        for opt in s.optimizers:
            s.scaler.step(opt)
        s.scaler.update()
    for opt in s.optimizers:
        opt.zero_grad(set_to_none=True)


def micro_batch(s: Session, offsets, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch k of this rank's share, on the device. CUDA: copied from pinned memory without waiting,
    so the CPU prepares the next step while the GPU still runs this one."""
    x, y = s.train_ds.get_batch(offsets)
    if s.mask_batch is not None:
        x, y = s.mask_batch(x, s.model_cfg.vocab_size, s.meta, s.step, k, s.ctx.rank, s.tcfg.seed)
    if s.device.type == "cuda":
        return x.pin_memory().to(s.device, non_blocking=True), y.pin_memory().to(s.device, non_blocking=True)
    return x.to(s.device), y.to(s.device)


DEFERRED_CHECK_DEVICES = ("cuda",)  # where a host sync per step costs real time (a test adds "cpu")


def checks_finite_on_device(device: torch.device, scaler: torch.amp.GradScaler, optimizers: list) -> bool:
    """Whether the finite check can stay on the device: a GPU, no fp16 scaler (it has its own found_inf) and only
    optimizers whose step reads found_inf (torch's fused Adam(W); not Muon)."""
    return device.type in DEFERRED_CHECK_DEVICES and not scaler.is_enabled() and all(
        getattr(o, "_step_supports_amp_scaling", False) for o in optimizers)


def check_finite(s: Session, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Whether to call the optimizers' step. On the host path (CPU, Muon, fp16) a non-finite loss or
    gradient stops the run here, naming the step, or (train.skip_nonfinite) skips the step. On the
    deferred path the check stays on the GPU: found_inf makes the fused AdamW kernels leave the
    weights and the step count alone, and report_nonfinite raises or warns at the next log or save."""
    finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    if s.scaler.is_enabled():  # fp16: an overflowing gradient is GradScaler's cue to skip the step and back off
        finite = torch.isfinite(loss_sum)
    if s.deferred_check:
        bad = ~finite
        for opt in s.optimizers:
            opt.found_inf = bad.float()  # read by torch's fused Adam(W) step
        s.first_bad_step.copy_(torch.where(bad & (s.first_bad_step < 0), s.step, s.first_bad_step))
        s.bad_steps.add_(bad.long())
        return True
    if bool(finite):
        return True
    if not s.tcfg.skip_nonfinite:
        s.log.close()
        raise UserError(f"non-finite loss or gradient at step {s.step} (loss {loss_sum.item()}, grad norm "
                        f"{grad_norm.item()}); no checkpoint written. Lower optim.lr or pass --train.skip_nonfinite")
    print(f"warning: skipping step {s.step}: non-finite loss or gradient", file=sys.stderr)
    s.skipped += 1
    return False


def report_nonfinite(s: Session) -> None:
    """The deferred path's verdict (one host sync), before anything is logged or saved."""
    if not s.deferred_check:
        return
    first, count = (int(v) for v in torch.stack([s.first_bad_step, s.bad_steps]).tolist())
    if first < 0:
        return
    if not s.tcfg.skip_nonfinite:
        s.log.close()
        raise UserError(f"non-finite loss or gradient at step {first} ({count} step(s) through {s.step - 1} skipped); "
                        "no checkpoint written. Lower optim.lr or pass --train.skip_nonfinite")
    print(f"warning: skipped {count} step(s) with a non-finite loss or gradient, the first at step {first}",
          file=sys.stderr)
    s.skipped += count
    s.first_bad_step.fill_(-1)
    s.bad_steps.zero_()


def _stop_now(s: Session) -> Optional[str]:
    """Ctrl-C / SIGTERM, or the time limit: every rank agrees (signals and clocks differ between ranks). Ranks
    agree at log steps only: each check is an all_reduce and a host read, which would stall the GPUs every step."""
    if s.ctx.world > 1 and s.step % s.tcfg.log_interval:
        return None
    if dist.any_rank(s.stop.requested, s.ctx):
        return INTERRUPTED
    if s.tcfg.max_time_s and dist.any_rank(s.elapsed >= s.tcfg.max_time_s, s.ctx):
        return f"time limit {s.tcfg.max_time_s}s"
    return None


# ---------------------------------------------------------------- evaluate and save
def evaluate_and_save(s: Session, metrics: dict, write: Callable[..., None]) -> Optional[str]:
    """Estimate train/val loss, print a sample, save a checkpoint (best if val improved); a stop reason or None."""
    tcfg = s.tcfg
    losses = estimate_loss(s.net, s.train_ds, s.val_ds, tcfg, s.device, s.autocast, s.mask_batch, s.meta)
    metrics.update(val_loss=losses["val"], val_ppl=math.exp(min(losses["val"], 50)), eval_train_loss=losses["train"])
    improved = losses["val"] < s.best_val
    s.best_val, s.bad_evals = (losses["val"], 0) if improved else (s.best_val, s.bad_evals + 1)
    if s.master:
        write(f"step {s.step}: train {losses['train']:.4f}, val {losses['val']:.4f} (ppl {metrics['val_ppl']:.2f})",
              file=sys.stderr)
    if tcfg.sample_tokens and tcfg.objective == "clm" and (s.master or s.ctx.parallel == "fsdp"):
        _sample(s, write)
    s.log.write(metrics)  # before the checkpoint, so a resume from it never lacks this row
    s.log.draw()
    save(s, improved)
    reason = s.on_eval(s.step, losses["val"]) if s.on_eval is not None else None
    if reason:
        s.stopped_by_caller = True
        return reason
    if tcfg.patience and s.bad_evals >= tcfg.patience:
        return f"early stopping: no val improvement in {s.bad_evals} evals"
    if tcfg.target_val_loss is not None and losses["val"] <= tcfg.target_val_loss:
        return f"reached target val loss {tcfg.target_val_loss}"
    return None


def _sample(s: Session, write: Callable[..., None]) -> None:
    """Print a sample of the model now and keep it in RUN/samples.jsonl."""
    tcfg = s.tcfg
    try:
        with dist.unsharded(s.net, s.ctx):  # FSDP: every rank runs the sample's forwards; rank 0 prints
            text = sample_text(s.net, s.data, tcfg.sample_prompt, tcfg.sample_tokens, s.device, tcfg.seed,
                               utf8_guard=tcfg.sample_utf8_guard)
    except (UserError, ImportError) as e:
        if s.master:
            write(f"(no sample: {e})", file=sys.stderr)
        return
    if s.master:
        write(f"---\n{text}\n---", file=sys.stderr)
        s.log.sample(s.step, tcfg.sample_prompt, text)


def save(s: Session, is_best: bool) -> None:
    """A checkpoint of everything a bit-exact resume needs: weights, optimizers, RNG, data cursor, counters."""
    report_nonfinite(s)  # deferred path: never save after an unreported non-finite step
    tcfg = s.tcfg
    state = {"step": s.step, "tokens": s.tokens, "best_val_loss": None if math.isinf(s.best_val) else s.best_val,
             "bad_evals": s.bad_evals, "skipped_steps": s.skipped, "elapsed_s": s.elapsed, "rng": rng_state(s.device),
             "threads": torch.get_num_threads(), "dtype": str(s.dtype).removeprefix("torch."),
             "data": {"seed": tcfg.seed, "step": s.step, "sampling": tcfg.sampling,
                      **dist.data_slices(tcfg.batch_size, s.per_rank, s.micro, s.ctx)},
             "scheduler": {"step": s.step, "lr": lr_at(s.step, s.ocfg, tcfg.max_iters)},
             "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None}
    save_training_checkpoint(s.out, s.net, s.optimizers, state, s.config, s.data / TOKENIZER_FILE, s.ctx,
                             tcfg.keep_last, is_best)


# ---------------------------------------------------------------- teardown
def finish(s: Session, stop_reason: str) -> dict:
    """The final whole-split eval (of best/), result.json, the report, closing the logs and the process group."""
    tcfg = s.tcfg
    report_nonfinite(s)  # the deferred path's count of skipped steps
    result = {"step": s.step, "tokens": s.tokens, "stop_reason": stop_reason,
              "best_val_loss": None if math.isinf(s.best_val) else s.best_val}
    if s.skipped:
        result["skipped_steps"] = s.skipped
    final_eval = tcfg.final_eval and stop_reason != INTERRUPTED and not s.stopped_by_caller
    if final_eval and (s.master or s.ctx.parallel == "fsdp") and tcfg.objective == "clm":  # FSDP: all ranks forward
        result["final_eval_checkpoint"] = _load_best_weights(s)
        with exact_fp32_matmuls():
            scores = evaluate_lm(s.net, s.val_ds, s.model_cfg.block_size, device=s.device)
        result.update({"final_" + k: v for k, v in scores.items()})
    result = finite_or_null(result)
    if s.master:
        atomic_write_json(s.out / RESULT_FILE, result)
        print(json_text(result), file=sys.stderr)
        s.log.draw()
        if tcfg.report:
            from .report import report_at_end

            report_at_end(s.out)
    s.log.close()
    dist.teardown(s.ctx)
    if s.skipped > tcfg.max_skipped_frac * s.step:
        raise UserError(f"{s.skipped} of {s.step} steps were skipped for a non-finite loss or gradient, more than "
                        f"--train.max_skipped_frac {tcfg.max_skipped_frac} allows: the run did not train (result.json "
                        "records it); lower --optim.lr")
    return result


def _load_best_weights(s: Session) -> str:
    """The final eval scores best/ (what sample, eval and serve load by default), so when the last model is
    not the best (early stopping, a late rise in val loss) best/'s weights replace it. Returns which was scored."""
    best = s.out / BEST
    if not (best / STATE_FILE).exists():
        return LATEST
    step = read_json(best / STATE_FILE)["step"]
    if step == s.step:
        return LATEST
    tensors = load_tensors(best / MODEL_FILE)
    if s.ctx.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(s.net, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        load_model_tensors(s.net, tensors)
    return f"best (step {step})"


# ---------------------------------------------------------------- helpers
@torch.no_grad()
def estimate_loss(net: GPT, train_ds, val_ds, tcfg: TrainConfig, device, autocast, mask_batch=None, meta=None) -> dict:
    """Mean loss over eval_iters fixed batches per split (fixed: comparable across evals, no RNG consumed)."""
    net.eval()
    out = {}
    for name, ds in (("train", train_ds), ("val", val_ds)):
        total = torch.zeros((), device=device)
        for i in range(tcfg.eval_iters):
            x, y = ds.get_batch(ds.batch_offsets(10**9 + i, min(tcfg.batch_size, 32), tcfg.seed))
            if mask_batch is not None:
                x, y = mask_batch(x, net.cfg.vocab_size, meta, 10**9 + i, 0, 0, tcfg.seed)
            with autocast:
                _, loss = net(x.to(device), y.to(device))
            total += loss.float()
        out[name] = (total / tcfg.eval_iters).item()
    net.train()
    return out


def sample_text(net: GPT, data: Path, prompt: str, n_tokens: int, device, seed: int, *, utf8_guard: bool = True) -> str:
    """A short sample during training (the prompt's continuation), from its own RNG so it never perturbs
    the training stream. UserError when the data dir has no usable tokenizer."""
    from .generate import generate
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(data)
    net.eval()
    try:
        # otherwise GenerationConfig's defaults
        return generate(net, tok, prompt, max_new_tokens=n_tokens, seed=seed, utf8_guard=utf8_guard)
    finally:
        net.train()


def _progress(tcfg: TrainConfig, master: bool, start: int):
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal (a log file gets the eval lines, not
    # thousands of carriage-return redraws)
    return tqdm(total=tcfg.max_iters, initial=start, disable=None if master and tcfg.progress else True, unit="step",
                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
