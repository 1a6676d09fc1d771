"""A training run before it starts: its config (TrainConfig), the request (RunRequest), the plan checked against the
data (Plan, `plan_run`) and what the loop holds (Session).

Everything here is decided before the first change on disk; train.py's `setup` builds the Session on a Plan.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch

from . import UserError
from . import distributed as dist
from . import cpu_wait, numerics
from .checks import SEED_MAX, ConfigError, check_fields
from .data import TokenDataset, default_data_dir, load_meta
from .model import GPT, ModelConfig
from .optim import OptimConfig
from .runtime import Peak, StopRequest, device_memory, tf32_matmuls
from .runs.config import read_run_config
from .runs.files import CONFIG_FILE
from .runs.guard import check_run_out
from .runs.log import RunLog
from .utils import json_text


@dataclass
class RunRequest:
    """One training run as `train` was asked for it: what `plan_run` resolves and `setup` builds."""

    data: Optional[Path] = None
    out: Optional[Path] = None
    model: Optional[ModelConfig] = None
    train: Optional[TrainConfig] = None
    optim: Optional[OptimConfig] = None
    resume: bool = False
    force: bool = False
    overrides: Optional[dict] = None
    """The dotted config keys the user gave: they win over a resumed run's saved config."""
    command: Optional[str] = None
    """The command line, recorded in config.json."""

@dataclass
class TrainConfig:
    """The loop. Every field is a `--train.<field>` flag and a `train:` config key."""

    batch_size: int = 12
    """Sequences per optimizer step, summed over ranks and accumulation micro-steps."""
    micro_batch_size: int = 0
    """Sequences per forward pass and rank; 0: batch_size / world size (no accumulation)."""
    max_iters: int = 1000
    """Optimizer steps (the default run: a few minutes on a laptop CPU)."""
    max_time_s: float = 0.0
    """If > 0, stop (and save) after this much wall time."""
    eval_interval: int = 250
    """Steps between val estimates, samples and checkpoints."""
    eval_iters: int = 20
    """Batches per split for the periodic train/val loss estimate."""
    log_interval: int = 10
    """Steps between metrics.jsonl rows."""
    seed: int = 1337
    """Seeds the init and the batches (a pure function of seed and step)."""
    sampling: Literal["random", "shuffle"] = "random"
    """How a batch's windows are drawn: random: starts uniform over the split, with replacement (nanoGPT's); shuffle:
    each epoch visits every block-aligned window once, in a random order, the blocks cut at a random phase each
    epoch (lower val loss once a run repeats its data: BENCHMARKS.md). Either is a pure function of the seed and
    the windows drawn before, so a resume goes on with the same batches."""
    device: str = "auto"
    """cpu, cuda, cuda:1, mps; auto: cuda (this rank's GPU under torchrun) > mps > cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast dtype; auto: bf16 on GPUs that have it, else fp16 (with loss scaling); on a CPU with bf16 arithmetic
    (AMX, AVX512-BF16) bf16 if a step of this model measures clearly faster (once per machine, cached, written to
    config.json), else fp32. On a CPU, bf16 autocast keeps attention in fp32 (torch's bf16 attention backward is slow)."""
    compile: bool = False
    """torch.compile the model (pays off on runs longer than its compile time)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode: reduce-overhead adds CUDA graphs (fewer kernel launches on GPUs); max-autotune also
    tunes matmul kernels (minutes of compiling)."""
    threads: int = 0
    """CPU threads for torch; 0: OMP_NUM_THREADS, else one per physical core (hyperthreads where measured faster,
    once per machine). The count used goes into the run's config.json: it changes the order of sums."""
    patience: int = 0
    """Early stopping: evals without val improvement before stopping; 0: off."""
    target_val_loss: Optional[float] = None
    """Stop once a val estimate reaches this; null: off."""
    sample_prompt: str = "\n"
    """Prompt of the samples printed at each eval."""
    sample_tokens: int = 200
    """Tokens of sample text printed at each eval; 0: off."""
    sample_utf8_guard: bool = True
    """The samples never hold a token whose bytes would break UTF-8 (byte-level tokenizers), as `sample`; false:
    every token may be sampled."""
    keep_last: int = 2
    """Complete checkpoints kept in RUN/checkpoints (latest and best are kept besides)."""
    skip_nonfinite: bool = False
    """On a NaN/inf loss or gradient: skip the batch instead of stopping the run."""
    max_skipped_frac: float = 0.1
    """With skip_nonfinite: the largest share of steps that may be skipped; past it the run fails."""
    final_eval: bool = True
    """Evaluate on the whole val split at the end (result.json's final_val_loss)."""
    peak_flops: float = 0.0
    """The MFU denominator in FLOP/s; 0: the GPU's datasheet figure for the dtype used (known GPUs), else
    measured once with a large matmul and cached (SCRATCHGPT_CACHE_DIR, default ~/.cache/scratchgpt)."""
    objective: Literal["clm", "mlm"] = "clm"
    """clm: next-token prediction (a GPT); mlm: BERT-style masking (bidirectional; cannot generate)."""
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    """Under torchrun: ddp (none means ddp there) or fsdp (FSDP2: shards parameters, grads, optimizer state)."""
    progress: bool = True
    """A progress bar on stderr."""
    tensorboard: bool = True
    """TensorBoard event files in RUN/tb (when tensorboard is installed)."""
    plot: bool = True
    """RUN/loss.png after each eval."""
    init_from: Optional[str] = None
    """Start from another run's weights (a run or checkpoint dir, e.g. made by import-hf): weights only, with a fresh
    optimizer and schedule; the architecture is that run's (only --model.dropout may change)."""
    report: bool = True
    """At the end: RUN/report.html (`scratchgpt report`) and a short summary on the terminal."""

    def __post_init__(self) -> None:
        check_fields(self, lambda name: f"--train.{name}", TRAIN_RANGES)


TRAIN_RANGES = {
    "batch_size": "[1, 1048576]", "micro_batch_size": "[0, 1048576]", "max_iters": "[1, inf)",
    "max_time_s": "[0, inf)", "eval_interval": "[1, inf)", "eval_iters": "[1, inf)", "log_interval": "[1, inf)",
    "seed": f"[0, {SEED_MAX}]", "threads": "[0, 1024]", "patience": "[0, inf)", "sample_tokens": "[0, 1048576]",
    "keep_last": "[1, inf)", "peak_flops": "[0, inf)", "max_skipped_frac": "[0, 1]",
}



@dataclass
class Plan:
    """A run resolved and checked before anything on disk changes: configs, data, batch split, start weights."""

    out: Path
    data: Path
    meta: dict
    model_cfg: ModelConfig
    tcfg: TrainConfig
    ocfg: OptimConfig
    resume: bool
    force: bool
    per_rank: int
    micro: int
    initial: Optional[dict]  # --train.init_from's weights


@dataclass
class Session(Plan):
    """Everything the loop touches, built once by `setup` on its Plan; `step`.. are the counters a checkpoint stores."""

    ctx: dist.DistContext
    device: torch.device
    net: GPT  # the plain model (checkpoints, evals, samples)
    model_for_step: torch.nn.Module  # what the step runs: DDP / FSDP / compiled wrappers of net
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    autocast: Any
    train_ds: TokenDataset
    val_ds: TokenDataset
    log: RunLog
    config: dict
    flops_per_step: float
    peak: Peak
    mask_batch: Optional[Callable]
    dtype: torch.dtype = torch.float32
    settled: Optional[numerics.Settled] = None  # how threads and the Newton-Schulz dtype were decided
    # CUDA with fused AdamW only: the finite check stays on the GPU (no host sync per step); a bad step's
    # update is skipped by the optimizer kernel itself (found_inf) and reported at the next log/save
    deferred_check: bool = False
    first_bad_step: Optional[torch.Tensor] = None  # -1 while every step was finite
    bad_steps: Optional[torch.Tensor] = None
    stop: StopRequest = field(default_factory=StopRequest)  # set by Ctrl-C / SIGTERM (train() installs it)
    on_eval: Optional[Callable[[int, float], Optional[str]]] = None
    stopped_by_caller: bool = False  # on_eval asked to stop: no final eval
    step: int = 0
    tokens: int = 0
    best_val: float = float("inf")
    bad_evals: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (train.skip_nonfinite)
    elapsed_before: float = 0.0
    t_start: float = field(default_factory=time.time)

    @property
    def master(self) -> bool:
        return self.ctx.rank == 0

    @property
    def accum(self) -> int:
        return self.per_rank // self.micro

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start



def resolve_config(req: RunRequest) -> RunRequest:
    """On resume the saved config wins, except for the train/optim keys the user gave (`req.overrides`).

    `req.out`, `model`, `train` and `optim` are set. A longer train.max_iters keeps the schedule's original length
    unless optim.decay_iters is given."""
    out, data, overrides = Path(req.out), req.data, req.overrides
    if not req.resume:
        return req
    if not (out / CONFIG_FILE).exists():
        raise UserError(f"{out}: nothing to resume (no config.json)")
    saved = read_run_config(out, sections=("model", "train", "optim"))
    sections = {"train": asdict(TrainConfig()) | saved["train"], "optim": asdict(OptimConfig()) | saved["optim"]}
    overrides = overrides or {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if section in sections:
            sections[section][name] = value
    optim_d, old_iters = sections["optim"], saved["train"].get("max_iters")
    if (not optim_d["decay_iters"] and "optim.decay_iters" not in overrides
            and sections["train"]["max_iters"] != old_iters and old_iters):
        optim_d["decay_iters"] = old_iters
        print(f"note: train.max_iters is now {sections['train']['max_iters']}; the LR schedule keeps its original "
              f"length of {old_iters} steps (give --optim.decay_iters to change it)", file=sys.stderr)
    try:
        return replace(req, data=data or Path(saved["data"]), model=ModelConfig(**saved["model"]),
                       train=TrainConfig(**sections["train"]), optim=OptimConfig(**optim_d))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{out / CONFIG_FILE}: cannot resume from it ({e})") from None


def plan_run(req: RunRequest) -> Plan:
    """Resolve the config (a resume's saved one, the user's keys over it) and check it against the data."""
    out, data, overrides = Path(req.out or "runs/default"), req.data, req.overrides
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: give a new directory name")
    # torchrun --max-restarts: a restarted worker resumes
    resume, force = dist.restart_mode(out, req.resume, req.force)
    tcfg = req.train or TrainConfig()
    inputs = [Path(p) for p in (data, tcfg.init_from) if p]
    force = check_run_out(out, resume=resume, force=force, inputs=inputs)  # True: an existing run is replaced
    req = resolve_config(replace(req, out=out, resume=resume, force=force, model=req.model or ModelConfig(),
                                 train=tcfg, optim=req.optim or OptimConfig()))
    data, model_cfg, tcfg, ocfg = req.data, req.model, req.train, req.optim
    data = Path(data) if data is not None else default_data_dir()
    meta = load_meta(data)
    n_vocab = meta["vocab_size"] + (tcfg.objective == "mlm")  # mlm: one extra id, the [MASK] token
    initial = None
    if tcfg.init_from and not resume:
        model_cfg, initial = initial_weights(tcfg.init_from, data, overrides or {})
    if model_cfg.vocab_size and model_cfg.vocab_size != n_vocab and not (initial and model_cfg.vocab_size > n_vocab):
        raise UserError(f"vocabulary mismatch: the model has {model_cfg.vocab_size} tokens, {data} has {meta['vocab_size']}")
    model_cfg.vocab_size = model_cfg.vocab_size if initial else n_vocab
    if tcfg.objective == "mlm":
        model_cfg.causal = False  # a masked token is predicted from both sides
    world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1
    ocfg = fit_warmup(ocfg, tcfg, overrides)
    per_rank, micro = check_relations(model_cfg, tcfg, ocfg, world, meta, data)
    return Plan(out, data, meta, model_cfg, tcfg, ocfg, resume, force, per_rank, micro, initial)



def initial_weights(source: str, data: Path, overrides: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """--train.init_from: the architecture and weights of another run, checked against the data's tokenizer."""
    from .checkpoint import load_run, model_tensors
    from .tokenizer import Tokenizer

    changed = sorted(k for k in overrides if k.startswith("model.") and k != "model.dropout")
    if changed:
        raise UserError(f"--{changed[0]} cannot change the architecture of --train.init_from {source} "
                        "(only --model.dropout can be set)")
    loaded = load_run(source)
    if Tokenizer.load(data).token_bytes_table() != loaded.tokenizer.token_bytes_table():
        raise UserError(f"{data} was prepared with another tokenizer than {source}: prepare the text with that run's "
                        f"tokenizer (scratchgpt prepare ... --tokenizer-from {loaded.checkpoint})")
    cfg = replace(loaded.gpt.cfg, dropout=overrides.get("model.dropout", loaded.gpt.cfg.dropout))
    print(f"initialised from {loaded.checkpoint} (weights only: a fresh optimizer and schedule)", file=sys.stderr)
    return cfg, model_tensors(loaded.gpt)


def startup_summary(s: Session) -> str:
    """What this run is about to do, printed (stderr, rank 0) before the progress bar."""
    from .muon import Muon
    from .runtime import device_name

    tcfg, cfg, ctx = s.tcfg, s.model_cfg, s.ctx
    step_tokens = tcfg.batch_size * cfg.block_size
    if ctx.world > 1 or ctx.parallel != "none":
        workers = f"{ctx.world} rank(s) ({ctx.parallel}, {ctx.device.type})"
    else:
        workers = f"{torch.get_num_threads()} threads" if s.device.type == "cpu" else "1 process"
        if s.device.type == "cpu" and cpu_wait.described():
            workers += f"; {cpu_wait.described()}"
    precision = "float32" if s.dtype == torch.float32 else f"{str(s.dtype).removeprefix('torch.')} autocast"
    if s.device.type == "cuda" and s.dtype == torch.float32 and tf32_matmuls():
        precision += " (TF32 matmuls)"
    if s.settled and s.settled.dtype_source:
        times = s.settled.dtype_times or {}
        precision += f" ({s.settled.dtype_source}" + "".join(
            f"; {k} {v * 1e3:.1f} ms" for k, v in times.items()) + (" a step" if times else "") + ")"
    name = f" ({device_name(s.device)})" if s.device.type == "cuda" else ""
    muon = [o for o in s.optimizers if isinstance(o, Muon)]
    optim = s.ocfg.optimizer
    if muon:
        settled = s.settled or numerics.Settled(None, str(muon[0].param_groups[0]["ns_dtype"]))
        how = settled.ns_source
        if settled.ns_times:
            how += ": " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in settled.ns_times.items()) + " per iteration"
        optim += f" (Newton-Schulz in {muon[0].param_groups[0]['ns_dtype']}{f'; {how}' if how else ''})"
    remaining = max(0, tcfg.max_iters - s.step)
    lines = [
        f"params: {s.net.num_params():,} ({s.net.num_params(non_embedding=True):,} non-embedding)",
        f"device: {s.device}{name}, {precision}, {workers}",
        f"data: {s.train_ds.n_tokens:,} train / {s.val_ds.n_tokens:,} val tokens",
        f"step: {step_tokens:,} tokens (batch {tcfg.batch_size} x context {cfg.block_size}; "
        f"{s.accum} micro-step(s) of {s.micro} per rank)",
        f"plan: {tcfg.max_iters:,} steps, {tcfg.max_iters * step_tokens:,} tokens "
        f"({tcfg.max_iters * step_tokens / max(s.train_ds.n_tokens, 1):.2f} epochs)"
        + (f"; resuming at step {s.step:,}, {remaining:,} to go" if s.step else ""),
        f"optimizer: {optim}",
        f"MFU peak: {s.peak.describe()}",
    ]
    return "\n".join(lines)


def fit_warmup(ocfg: OptimConfig, tcfg: TrainConfig, given: Optional[dict]) -> OptimConfig:
    """A warmup the user did not set (a default, or the recipe's) shrinks to a tenth of a schedule it would
    outlast, with a note: `--train.max_iters 3` is a fine quick run. A warmup the user set must fit (checked next)."""
    length = ocfg.decay_iters or tcfg.max_iters
    if given is None or "optim.warmup_iters" in given or ocfg.warmup_iters <= length:
        return ocfg
    warmup = length // 10
    print(f"note: a {length}-step schedule: warmup shortened from {ocfg.warmup_iters} to {warmup} steps "
          "(--optim.warmup_iters sets it)", file=sys.stderr)
    return replace(ocfg, warmup_iters=warmup)


def check_relations(model_cfg: ModelConfig, tcfg: TrainConfig, ocfg: OptimConfig, world: int, meta: dict,
                    data: Path) -> tuple[int, int]:
    """The checks that span several options, or options and data; (per-rank batch, micro-batch) when they pass."""
    for split in ("train", "val"):
        if model_cfg.block_size >= meta[f"{split}_tokens"]:
            raise ConfigError(f"--model.block_size {model_cfg.block_size} must be < the {meta[f'{split}_tokens']} "
                              f"tokens of the {split} split of {data}")
    if tcfg.batch_size % world:
        raise ConfigError(f"--train.batch_size {tcfg.batch_size} must be a multiple of the {world} ranks")
    per_rank = tcfg.batch_size // world
    micro = min(tcfg.micro_batch_size or per_rank, per_rank)  # a resume on more ranks may shrink a rank's share
    if per_rank % micro:
        raise ConfigError(f"--train.micro_batch_size {tcfg.micro_batch_size} must divide the batch of {per_rank} "
                          f"per rank (--train.batch_size {tcfg.batch_size} over {world} rank(s))")
    if ocfg.decay_iters and ocfg.warmup_iters > ocfg.decay_iters:  # (a run may be the start of a longer schedule)
        raise ConfigError(f"--optim.warmup_iters {ocfg.warmup_iters} must be <= --optim.decay_iters "
                          f"{ocfg.decay_iters}, the length of the LR schedule")
    if not ocfg.decay_iters and ocfg.warmup_iters > tcfg.max_iters:
        raise ConfigError(f"--optim.warmup_iters {ocfg.warmup_iters} must be <= --train.max_iters {tcfg.max_iters} "
                          "(the run would end before its warmup does)")
    return per_rank, micro


def check_memory(cfg: ModelConfig, micro: int, ctx: dist.DistContext) -> None:
    """Refuse a model that cannot fit before allocating it (a typo in a width can ask for terabytes)."""
    params, need = GPT.training_bytes(cfg, micro, ctx.world if ctx.parallel == "fsdp" else 1)
    have = device_memory(ctx.device)
    if have is not None and need > have:
        raise UserError(f"this model ({params:,} parameters, micro-batches of {micro} x {cfg.block_size} tokens) needs "
                        f"at least {need / 2**30:,.1f} GiB to train; {ctx.device} has {have / 2**30:,.1f} GiB. "
                        "Make --model.n_layer/n_embd/block_size or --train.micro_batch_size smaller")


def check_same_model(net: GPT, ckpt: Path, out: Path) -> None:
    """The model RUN/config.json describes is the one the checkpoint holds (its own config.json is hashed)."""
    from .checkpoint.load import checkpoint_config

    theirs = checkpoint_config(ckpt / CONFIG_FILE)["model"]  # (its shape checked: the hashes may be fixed up)
    ours = json.loads(json_text(asdict(net.cfg)))
    for key in sorted(theirs.keys() & ours.keys()):
        if theirs[key] != ours[key]:
            raise UserError(f"{out / CONFIG_FILE}: model.{key} is {str(ours[key])[:40]}, but {ckpt} was trained with "
                            f"{str(theirs[key])[:40]}; restore it from {ckpt / CONFIG_FILE}")
