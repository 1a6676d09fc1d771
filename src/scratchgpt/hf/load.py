"""Import: a transformers model folder -> a scratchgpt run.

`import_hf` reads model.safetensors or a sharded index (fp32, fp16 or bf16; held as fp32) for the
classes of FAMILIES and writes a scratchgpt run. pytorch_model.bin is refused in one line (loading it
means unpickling, which can run code); so is any other model_type, and whatever config.py and
layout.py refuse. Export -> import -> export reproduces model.safetensors and config.json byte for
byte.

Tokenizers: any tokenizer.json the `tokenizers` library loads imports (one it cannot load is refused
in one line); files in scratchgpt's own char/bpe shapes load as those kinds, every other one (Llama's
byte-fallback BPE, SmolLM2's or Qwen's byte-level BPE with their splits and normalizers...) as kind
"hf", encoded by `tokenizers` itself. Every kind keeps the side files beside it (tokenizer_config.json,
special_tokens_map.json, the chat template files): the released SmolLM2-135M-Instruct's tokenizer.json is
GPT-2-shaped, so it is kind "bpe", and still stops at <|im_end|> and chats in its own template. Its eos is
tokenizer_config.json's eos_token, else config.json's (or generation_config.json's) eos_token_id, which
import then writes into the run's tokenizer_config.json (unless it is the kind's own <|endoftext|>).
The model's generation_config.json (else one holding config.json's eos_token_id) goes beside it too:
its eos_token_id list (Llama 3 Instruct's <|eot_id|>) also ends generated text (Tokenizer.stop_ids).
GPT-2's tokenizer.json (byte-level BPE, `<|endoftext|>` = 50256 as an added token, the BPE model
written without a "type" in older files) loads as a scratchgpt bpe tokenizer that encodes exactly as
transformers' GPT-2 tokenizer does, with one deliberate difference: a literal `<|endoftext|>` in text
stays plain characters (transformers' default makes it id 50256; `split_special_tokens=True` there
gives our ids, and prompts.encode_with_eot gives theirs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open

from .. import UserError
from ..checkpoint import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, StreamedTensors, model_tensors, write_checkpoint
from ..model import GPT, ModelConfig
from ..tokenizer import HF_CONFIG_FILE, HF_GENERATION_FILE, Tokenizer, copy_tokenizer
from ..runs.config import write_run_config
from ..runs.guard import check_out
from ..runs.staging import staged
from ..utils import atomic_write_bytes, atomic_write_json, first_line, read_json, sha256_file
from .config import config_from_hf, json_bytes
from .families import FAMILIES, import_model_type
from .layout import expected_shapes
from .layout_in import from_hf_tensors, hf_converter


def _weight_files(d: Path) -> tuple[list[str], Optional[set[str]]]:
    """(the safetensors files of folder `d`, the tensor names its index promises, or None without an index)."""
    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").is_file():
        return ["model.safetensors"], None
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("weight_map is not a mapping of tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if Path(f).name != f or not (d / f).is_file():
                raise UserError(f"{index}: shard {f!r} is missing from {d}")
        return files, set(weight_map)
    if any(d.glob("pytorch_model*.bin")):
        raise UserError(f"{d} holds only pytorch_model.bin, a pickle: loading it means unpickling, which can run "
                        "arbitrary code; convert it to safetensors with transformers (save_pretrained) and import that")
    raise UserError(f"{d}: no model.safetensors or model.safetensors.index.json")


def _read_hf_config(d: Path) -> dict[str, Any]:
    """config.json of transformers folder `d`, checked to be a folder with a JSON object there."""
    if not d.is_dir():
        raise UserError(f"{d}: no such directory")
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: no config.json (not a transformers model folder)")
    try:
        hf_cfg = read_json(d / "config.json")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise UserError(f"{d / 'config.json'}: expected a JSON object (a model's settings), got a "
                        f"{type(hf_cfg).__name__}")
    return hf_cfg


def read_hf_folder(hf_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, every tensor as fp32) of a transformers folder: model.safetensors or a sharded index.

    fp16 and bf16 weights are widened to fp32 (exact). pytorch_model.bin is refused: it is a
    pickle, and unpickling a file can run arbitrary code.
    """
    d = Path(hf_dir)
    hf_cfg = _read_hf_config(d)
    with _weight_reader(d) as (shapes, load):
        tensors = {k: load(k) for k in shapes}
    return hf_cfg, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


@contextlib.contextmanager
def _weight_reader(d: Path) -> Iterator[tuple[dict[str, torch.Tensor], Callable[[str], torch.Tensor]]]:
    """(every tensor of folder `d`'s safetensors files as a meta tensor: its shape and dtype, nothing read;
    load(name): that tensor read into memory of its own). A tensor in two shards, or an index that disagrees with
    the shards, is a UserError."""
    files, expected = _weight_files(d)
    with contextlib.ExitStack() as stack:
        where, shapes = {}, {}
        for f in files:
            handle = stack.enter_context(_open_safetensors(d / f))
            for k in handle.keys():
                if k in where:
                    raise UserError(f"{d / f}: tensor {k} also appears in another shard")
                where[k] = (d / f, handle)
                piece = handle.get_slice(k)
                dtype = _DTYPES.get(piece.get_dtype()) or handle.get_tensor(k).dtype  # (a rarer one: read it once)
                shapes[k] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        if expected is not None and expected != set(shapes):
            diff = sorted(expected ^ set(shapes))
            raise UserError(f"{d / 'model.safetensors.index.json'}: the index and the shards disagree about {diff[0]}")

        def load(k: str) -> torch.Tensor:
            path, handle = where[k]
            try:
                return handle.get_tensor(k)
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{path}: cannot read {k} ({first_line(e)})"
                                ) from None

        yield shapes, load


# safetensors' names of the usual dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _open_safetensors(path: Path):
    """safe_open reading each tensor with pread(2) into memory of its own (safetensors >= 0.8; older ones map the
    file), so a converted tensor's source is freed with it; an unreadable file is a UserError."""
    try:
        try:
            return safe_open(str(path), framework="pt", backend="pread")
        except TypeError:  # safetensors < 0.8: no backend
            return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({first_line(e)})") from None


def state_dict_from_hf(hf_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                       cfg: Optional[ModelConfig] = None) -> dict[str, torch.Tensor]:
    """Our model's fp32 state dict (tied head omitted) from a transformers model's tensors."""
    mt = import_model_type(hf_config)
    return from_hf_tensors(mt, cfg or config_from_hf(hf_config, tensors), tensors)


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A transformers tokenizer.json (or a folder holding one, with its tokenizer_config.json).

    Files in exactly the shape scratchgpt writes load as its char or bpe kinds (fast encoders that
    agree with `tokenizers`), any other file the `tokenizers` library loads as kind "hf"; a file it
    cannot load is a one-line UserError.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no tokenizer.json at {path}")
    return Tokenizer.load(path)


def _eos_from_config(hf_dir: Path, tok: Tokenizer) -> Optional[str]:
    """The eos token named by config.json's (else generation_config.json's) eos_token_id, for an imported
    tokenizer whose tokenizer_config.json names none; the first one where it is a list (Llama 3's)."""
    for name in ("config.json", "generation_config.json"):
        try:
            eos = read_json(hf_dir / name).get("eos_token_id") if (hf_dir / name).is_file() else None
        except ValueError:
            eos = None
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if type(eos) is int and 0 <= eos < tok.vocab_size and tok.id_to_token(eos):
            return tok.id_to_token(eos)
    return None


def _generation_file(hf_dir: Path) -> Optional[bytes]:
    """The model folder's generation_config.json (its eos_token_id, a list for Llama 3 Instruct), else one
    holding config.json's eos_token_id (transformers' generate falls back to it the same way)."""
    if (hf_dir / HF_GENERATION_FILE).is_file():
        return (hf_dir / HF_GENERATION_FILE).read_bytes()
    try:
        eos = read_json(hf_dir / "config.json").get("eos_token_id")
    except (OSError, ValueError):
        return None
    return json_bytes({"eos_token_id": eos}) if eos is not None else None


def _convert(hf_dir: Path, hf_cfg: Mapping[str, Any], shapes: dict[str, torch.Tensor],
             load: Callable[[str], torch.Tensor]) -> tuple[str, ModelConfig, StreamedTensors]:
    """(model_type, ModelConfig, our weights made tensor by tensor as they are written) of a folder whose tensors
    are `shapes` (meta) and `load`; a refusal names the file it is about (config.json, or the weights)."""
    biases = {k: load(k) if k.endswith("bias") else v for k, v in shapes.items()}  # (what settles model.bias)
    try:
        mt = import_model_type(hf_cfg)
        cfg = config_from_hf(hf_cfg, biases)
    except UserError as e:
        raise UserError(f"{hf_dir / 'config.json'}: {str(e).removeprefix('config.json: ')}") from None
    del biases
    weights = "model.safetensors" if (hf_dir / "model.safetensors").is_file() else "model.safetensors.index.json"
    try:
        make = hf_converter(mt, cfg, shapes, load)
    except UserError as e:
        raise UserError(f"{hf_dir / weights}: {e}") from None
    return mt, cfg, StreamedTensors(expected_shapes(cfg), make)


def _import_tokenizer(hf_dir: Path, tokenizer: Optional[str | os.PathLike],
                      cfg: ModelConfig) -> tuple[Path, Tokenizer, Optional[str], Optional[bytes]]:
    """(tokenizer.json path, the tokenizer, the eos token to record, the generation_config.json to add)."""
    tok_path = Path(tokenizer) if tokenizer is not None else hf_dir
    if tok_path.is_dir():
        tok_path = tok_path / TOKENIZER_FILE
    if not tok_path.is_file():
        raise UserError(f"no tokenizer.json at {tok_path}: scratchgpt needs the model's tokenizer (pass tokenizer=PATH)")
    tok = load_hf_tokenizer(tok_path)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{tok_path}: {tok.vocab_size} tokens, but the model has only {cfg.vocab_size} embeddings")
    # every kind keeps the model's eos and eos list (SmolLM2's GPT-2-shaped tokenizer.json is kind "bpe")
    named = "eos_token" in tok.special_tokens()
    eos = _eos_from_config(hf_dir, tok) if tok.eot_id is None or not named else None
    if eos == tok.eot_token:
        eos = None  # (the tokenizer's own default already: GPT-2's <|endoftext|>)
    generation = _generation_file(hf_dir)
    if generation == tok.side_files.get(HF_GENERATION_FILE):
        generation = None  # copied with the tokenizer already
    return tok_path, tok, eos, generation


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tokenizer: Optional[str | os.PathLike] = None,
              force: bool = False, name: Optional[str] = None) -> Path:
    """Write a scratchgpt run (out/config.json, out/best, out/latest) from a transformers model folder.

    The tokenizer is the folder's tokenizer.json unless `tokenizer` names another file or
    folder. config["imported_from"] records the source's name (`name`, a hub name; default: the
    folder's name), path, class and file hashes. Returns `out`.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    check_out(out, "run", force=force, inputs=[hf_dir] + ([Path(tokenizer)] if tokenizer else []))
    hf_cfg = _read_hf_config(hf_dir)
    # the weights are read, converted and written one tensor at a time (StreamedTensors): the model is never
    # held whole, so the peak is torch, the tokenizer and the largest tensor (SmolLM2's embedding)
    with _weight_reader(hf_dir) as (shapes, load):
        mt, cfg, sd = _convert(hf_dir, hf_cfg, shapes, load)
        tok_path, tok, eos, generation = _import_tokenizer(hf_dir, tokenizer, cfg)
        files = sorted(p.name for p in hf_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
        origin = {"name": name or hf_dir.resolve().name, "path": str(hf_dir.resolve()),
                  "architecture": FAMILIES[mt].causal_lm, "model_type": mt,
                  "sha256": {f: sha256_file(hf_dir / f) for f in files}}
        inputs = [hf_dir] + ([Path(tokenizer)] if tokenizer else [])
        return write_imported_run(out, cfg, sd, tok_path, tok, origin, eos=eos, generation=generation, force=force,
                                  inputs=inputs)


def write_imported_run(out: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor] | StreamedTensors, tok_path: Path,
                       tok: Tokenizer,
                       origin: dict[str, Any], *, eos: Optional[str] = None, generation: Optional[bytes] = None,
                       force: bool = False, inputs: list[Path] = ()) -> Path:
    """Write the run `out` (config.json, best, latest) of an imported model: its config, fp32 state dict (tied
    head omitted; or StreamedTensors, made while written), `tok` as read from `tok_path` (tokenizer.json with its
    side files; `eos` named in tokenizer_config.json and `generation` as generation_config.json where given) and
    config["imported_from"] = `origin`. Staged (runs.staging): a failure writes nothing."""
    if not isinstance(sd, StreamedTensors):
        model, missing, unexpected = GPT.with_weights(cfg, sd)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # (checked by the callers)
        sd = model_tensors(model)
    config = {"format_version": 1, "data": None, "model": asdict(cfg), "train": {}, "optim": {},
              "tokenizer": tok.kind, "imported_from": origin}
    with staged(out, "run", force=force, inputs=inputs) as tmp:
        if eos is not None or generation is not None:
            (tmp / "tokenizer").mkdir()
            copy_tokenizer(tok_path, tmp / "tokenizer")
            if eos is not None:  # the run's tokenizer_config.json names it, so every later copy stops there too
                atomic_write_json(tmp / "tokenizer" / HF_CONFIG_FILE, dict(tok.hf_config, eos_token=eos))
            if generation is not None:  # the model's eos ids (Llama 3's list) end its turns wherever the run goes
                atomic_write_bytes(tmp / "tokenizer" / HF_GENERATION_FILE, generation)
            tok_path = tmp / "tokenizer" / TOKENIZER_FILE
        write_checkpoint(tmp, 0, tensors={MODEL_FILE: sd}, json_files={CONFIG_FILE: config}, tokenizer_file=tok_path,
                         state={"step": 0, "tokens": 0, "best_val_loss": None}, aliases=["latest", "best"])
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
        write_run_config(tmp, config)  # the run-level copy, as train writes it
    return out
