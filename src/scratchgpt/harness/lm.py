"""`ScratchLM`: a scratchgpt model as an lm-evaluation-harness model (an `lm_eval.api.model.LM`).

It answers the harness's three request kinds with scratchgpt's own code: `loglikelihood` and
`loglikelihood_rolling` through scoring.py (batched, each shared context computed once), `generate_until`
through generate.complete (batched, KV cache). Tokenization, truncation, rolling windows and stop sequences
follow the harness's transformers backend (HFLM) on the `scratchgpt export` of the same model, so the two
give the same metrics (the tests compare them). Importing this module needs lm-eval.

From Python: `lm_eval.simple_evaluate(model=ScratchLM.from_run("runs/x"), tasks=[...])`; from lm-eval's own
command line, after `import scratchgpt.harness.lm`: `--model scratchgpt --model_args run=runs/x,quantize=int8`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .. import UserError
from ..checkpoint import load_run
from ..generate import complete
from ..model import gpt_of
from ..prompts import ChatTemplate, JinjaChatTemplate
from ..quantize import quantize_model
from ..tokenizer.files import HF_CONFIG_FILE
from .scoring import score

MAX_GEN_TOKS = 256  # a generation task's token limit when its YAML gives none (HFLM's default)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _reads_special_tokens(tokenizer, config: dict) -> bool:
    """Whether transformers' tokenizer(text) on the export makes special-token strings in text those tokens
    (hf/export.py's tokenizer_config.json): an imported tokenizer as it came (split_special_tokens, default
    false); scratchgpt's own keeps them plain characters, but an SFT run's reads them (its chat template's eos)."""
    if tokenizer.kind == "hf" or HF_CONFIG_FILE in tokenizer.side_files:
        return not tokenizer.hf_config.get("split_special_tokens")
    return bool(config.get("chat_template"))


@register_model("scratchgpt")
class ScratchLM(TemplateLM):
    """A causal scratchgpt model (`model`: a GPT, or a PEFT-wrapped one: an unmerged LoRA) and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: Optional[dict] = None, *, batch_size: int = 16,
                 max_gen_toks: int = MAX_GEN_TOKS, name: str = "scratchgpt") -> None:
        super().__init__()
        gpt = gpt_of(model)
        if not gpt.cfg.causal:
            raise UserError("a bidirectional (model.causal=false, mlm) model cannot be scored by lm-evaluation-harness"
                            ": its tasks need next-token log-probabilities and generation from a causal model")
        self.model, self.gpt, self.tok, self.config = model.eval(), gpt, tokenizer, dict(config or {})
        self.batch_size, self.max_gen_toks, self.name = int(batch_size), int(max_gen_toks), name
        self.max_length = gpt.cfg.block_size
        self._encode = tokenizer.encode_with_special_tokens if _reads_special_tokens(tokenizer, self.config) \
            else tokenizer.encode
        self._jinja: Optional[str] = None
        self.fewshot = 0  # set (--num-fewshot): a prompt past the context is an error, not silently cut

    def _check_fits(self, length: int, room: int) -> None:
        if self.fewshot and length > room:
            raise UserError(f"with --num-fewshot {self.fewshot} a prompt is {length} tokens, past the {room} the "
                            f"model's context of {self.max_length} leaves: use fewer shots")

    @classmethod
    def from_run(cls, run: str | Path, which: str = "best", *, base: Optional[str | Path] = None,
                 quantize: str = "none", merge_lora: bool = False, dtype: str = "float32", **options) -> "ScratchLM":
        """A run as every command loads it (load_run): pretrained, imported, fine-tuned, LoRA (unmerged unless
        merge_lora; quantizing merges it first), quantized. dtype float64 gives figures with no float32 rounding."""
        quantized = quantize not in (None, "none")
        loaded = load_run(run, which, base=base, merge=merge_lora or quantized)
        model = loaded.language_model("eval --task harness")
        if loaded.is_lora and not (merge_lora or quantized):
            model = loaded.model  # the PEFT wrapper: the adapters run beside the base weights
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        model.to(DTYPES[dtype])
        quantize_model(gpt_of(model), quantize)
        return cls(model, loaded.tokenizer, loaded.config, name=str(run), **options)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "ScratchLM":
        """lm-eval's `--model scratchgpt --model_args run=DIR,which=best,quantize=int8,batch_size=16`."""
        args = {k: v for k, v in {**arg_dict, **(additional_config or {})}.items() if v is not None}
        args.pop("device", None)
        if "batch_size" in args:
            args["batch_size"] = int(args["batch_size"]) if str(args["batch_size"]).isdigit() else 16
        return cls.from_run(args.pop("run"), **args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "ScratchLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        eot = self.tok.eot_id
        return eot if eot is not None else 0

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: the bos token, else the eos (HFLM's rule)."""
        bos = self.tok.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return next(self.gpt.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """transformers' tokenizer.encode(string) on the export: the bos first where it puts one (an imported
        Llama's <s>), unless the text already starts with it."""
        bos = self.tok.bos_ids
        if add_special_tokens is None:
            add_special_tokens = not (bos and string.startswith(self.tok.decode([self.prefix_token_id])))
        return (bos if add_special_tokens else []) + self._encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # ---------------------------------------------------------------- the three request kinds
    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # (its bar counts tokenizing, not scoring)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        for _, ctx, cont in requests:
            self._check_fits(len(ctx) + len(cont), self.max_length + 1)
        results = score(self.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length, self.batch_size)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in windows of max_length tokens (the harness's own windows)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, score(self.model, windows, self.max_length, self.batch_size)):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, where a task asks, sampled) continuations, cut at the task's stop sequences and the eos."""
        out: list[Optional[str]] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tok.eot_token
        for members in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_gen
            if room <= 0:
                raise UserError(f"a task asks for {max_gen} generated tokens, but the model's context is "
                                f"{self.max_length}: set max_gen_toks lower in its YAML (generation_kwargs)")
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            for s in range(0, len(members), self.batch_size):
                chunk = members[s : s + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) for i in chunk]
                for p in prompts:
                    self._check_fits(len(p), room)
                prompts = [p[-room:] for p in prompts]
                done = complete(self.model, self.tok, prompts,
                                temperature=temperature, max_new_tokens=max_gen, stop=tuple(t for t in until if t),
                                utf8_guard=False, seed=1234, note=lambda m: None)
                for i, c in zip(chunk, done):
                    text = postprocess_generated_text(c.text, until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [t or "" for t in out]

    # ---------------------------------------------------------------- chat templates (--apply-chat-template)
    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        """The jinja template the export writes: an SFT run's own template as jinja, else an imported model's."""
        if chat_template is False or chat_template is None:
            return None
        if self._jinja is None:
            sft = ChatTemplate.from_config(self.config)
            source = sft.to_jinja(self.tok) if sft else self.tok.chat_template
            if isinstance(source, list):
                source = {t.get("name"): t.get("template") for t in source}.get("default")
            if not source:
                raise UserError(f"{self.name} has no chat template (an SFT run or an imported instruct model has "
                                "one): leave out --apply-chat-template")
            self._jinja = source
        return self._jinja

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """transformers' apply_chat_template(..., tokenize=False, continue_final_message=not add_generation_prompt)
        as HFLM calls it: without a generation prompt the text ends where the last message's content ends."""
        text = JinjaChatTemplate(self.tok, self.chat_template(True)).render(chat_history, add_generation_prompt)
        if not add_generation_prompt and chat_history:
            last = chat_history[-1]["content"].strip()
            at = text.rfind(last)
            if at >= 0:
                text = text[: at + len(last)]
        return text
