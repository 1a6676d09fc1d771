"""Hugging Face transformers interop: export a checkpoint as a stock transformers model, import one back.

An exported folder loads with `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)`, no `trust_remote_code`: every scratchgpt model that
has an exact standard twin is written as that class, with the same math, so fp32 logits
agree within 1e-4 and greedy decoding agrees token for token. Nothing is approximated:
a model without an exact twin is refused with one line naming the option.

Mapping (our `ModelConfig` -> transformers class, and the config keys that carry the choice):

    pos      norm       placement  mlp         -> class (model_type)
    learned  layernorm  pre        plain       -> GPT2LMHeadModel (gpt2): activation_function, n_inner
    learned  layernorm  post       plain       -> OPTForCausalLM (opt): do_layer_norm_before=false
    rope     layernorm  pre        plain       -> GPTNeoXForCausalLM (gpt_neox): use_parallel_residual=false,
                                                 partial_rotary_factor=1, hidden_act
    rope     rmsnorm    pre        gated       -> LlamaForCausalLM (llama): hidden_act=silu (swiglu) or
                                                 gelu_pytorch_tanh (geglu_tanh); on request (model_type), or
                                                 when imported from one, with bias=false:
                                                 MistralForCausalLM (mistral): sliding_window=null
                                                 Phi3ForCausalLM (phi3): fused qkv_proj, gate_up_proj
    rope     rmsnorm    pre        plain       -> ArceeForCausalLM (arcee): Llama with a plain up/down MLP
    rope     rmsnorm    pre        gated,      -> Qwen3ForCausalLM (qwen3): bias=false only (Qwen3's MLP has
                                   qk_norm        no biases); q_norm/k_norm weights are ones, eps 1e-6
    rope     rmsnorm    pre        gated,      -> Qwen2ForCausalLM (qwen2): q/k/v biases, nothing else (bias=false)
                                   qkv_bias
    rope     rmsnorm    pre        gated,      -> GemmaForCausalLM (gemma): norm weights minus one (its RMSNorm
                                   scale_         scales by 1 + w), bias=false
                                   embeddings

Every Llama-shaped row (rope, rmsnorm, pre) carries n_kv_head (num_key_value_heads), head_size
(head_dim) and Llama 3's rope_scaling (not Phi-3); the others have neither.

The parts, each with the documentation of what it does:

    families.py  which class computes a ModelConfig (and what is refused); which class a config.json names
    layout.py    where each of our tensors lives in each family, both directions
    layout_in.py reading a folder's tensors into ours, one at a time; masks of old GPT-2 files
    config.py    config.json read: the keys, activations, epsilons, RoPE scaling (the mapping, both ways)
    config_out.py  config.json written (hf_config)
    export.py    export_checkpoint: the folder, classifiers, the tokenizer files
    card.py      the README.md model cards
    adapter.py   LoRA runs as PEFT adapter folders
    load.py      import_hf: reading folders and shards, tokenizers, writing the run
    hub.py       hub names: download_model (import-hf ORG/NAME), push_folder (export --push-to-hub)
    gguf_layout.py  GGUF (llama.cpp): its architectures, tensor names, pre-tokenizers
    gguf_in.py   import_gguf: a GGUF file (dequantized) -> a run
    gguf_out.py  export_gguf: a checkpoint -> a GGUF file llama.cpp runs

Public API:
    hf_architecture(cfg, classifier_pooling=None, *, model_type=None) -> str
    hf_config(cfg, *, eot_id=None, pad_token_id=None, labels=None, bos_id=None, model_type=None) -> dict
    state_dict_to_hf(cfg, tensors, *, model_type=None) -> dict[str, Tensor]
    export_checkpoint(ckpt, out, *, which="best", force=False, model_type=None) -> Path
    read_hf_folder(hf_dir) -> (hf config dict, fp32 tensors)
    config_from_hf(hf_config, tensors=None) -> ModelConfig
    state_dict_from_hf(hf_config, tensors, cfg=None) -> dict[str, Tensor]
    load_hf_tokenizer(path) -> Tokenizer
    import_hf(hf_dir, out, *, tokenizer=None, force=False, name=None) -> Path
    is_hub_name(source) -> bool; download_model(repo_id, revision=None) -> Path
    push_folder(folder, repo_id, *, private=False, message=None) -> str
    adapter_to_hf(cfg, adapter_config, tensors, base_model_name_or_path="base", *, model_type=None)
        -> (adapter_config.json, tensors)
    export_adapter(ckpt, out, *, which="best", force=False, base=None, model_type=None) -> Path
    is_gguf(path) -> bool
    import_gguf(path, out, *, force=False) -> Path
    export_gguf(ckpt, out, *, which="best", outtype="f32", force=False) -> Path
`model_type` picks among the classes that compute the same model (llama, mistral, phi3); None: the
family a run was imported from where it still fits, else the natural class.
`transformers` itself is never imported here: the files are written and read directly (GGUF files
with llama.cpp's `gguf` package).
"""

from .adapter import adapter_to_hf, export_adapter
from .config import config_from_hf
from .config_out import hf_config
from .export import export_checkpoint
from .families import FAMILIES, hf_architecture
from .hub import check_repo_id, download_model, is_hub_name, push_folder
from .gguf_in import import_gguf, is_gguf
from .gguf_out import export_gguf
from .layout import state_dict_to_hf
from .load import import_hf, load_hf_tokenizer, read_hf_folder, state_dict_from_hf

__all__ = [
    "FAMILIES",
    "hf_architecture",
    "hf_config",
    "state_dict_to_hf",
    "export_checkpoint",
    "read_hf_folder",
    "config_from_hf",
    "state_dict_from_hf",
    "load_hf_tokenizer",
    "import_hf",
    "adapter_to_hf",
    "export_adapter",
    "is_hub_name",
    "download_model",
    "push_folder",
    "check_repo_id",
    "is_gguf",
    "import_gguf",
    "export_gguf",
]
