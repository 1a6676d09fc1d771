"""Every file and folder name scratchgpt writes, defined once.

A leaf module (it imports nothing of the package), so the checkpoint store, the tokenizer, the data
directory and the commands all take their names from here.
"""

from __future__ import annotations

# a run directory (train, finetune, import-hf, merge-lora)
CONFIG_FILE = "config.json"  # the run's config (and each checkpoint's copy)
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
RESULT_FILE = "result.json"
REPORT_FILE = "report.html"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tb"
LATEST, BEST, CHECKPOINTS = "latest", "best", "checkpoints"
OLD_EVAL_FILE = "eval.json"  # the earlier name of eval-lm.json (still written beside it, and read)


def eval_file(task: str, quantize: str = "none") -> str:
    """Where `scratchgpt eval` keeps its result in the run: eval-lm.json, eval-lm-int8.json (beside, not over)."""
    return f"eval-{task}.json" if quantize == "none" else f"eval-{task}-{quantize}.json"


CHECKPOINT_PREFIX = "step-"  # checkpoints/step-0000010

# a checkpoint directory (RUN/checkpoints/step-N; latest/ and best/ point at one)
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.json"
HEAD_FILE = "head.safetensors"  # a classifier's head
ADAPTER_FILE, ADAPTER_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"  # LoRA (PEFT's names)

# a prepared data directory
META_FILE = "meta.json"
SPLIT_FILES = ("train.bin", "val.bin")

# a search directory (tune)
STUDY_FILE, TRIALS_FILE = "study.json", "trials.jsonl"
SEARCH_BEST_FILE, SEARCH_BEST_CONFIG_FILE, SEARCH_PLOT_FILE = "best.json", "best-config.json", "search.png"
TRIAL_LOG_FILE = "train.log"  # in each trial's run: its training output (the terminal shows one line per trial)

# written into every folder scratchgpt makes (runs, data dirs, exports, searches): what kind of artifact it is.
# --out/--force replace only a folder holding this marker with the same kind (runs/guard.py)
MARKER_FILE = ".scratchgpt"
