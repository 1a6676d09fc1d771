"""Character, byte-level BPE and imported tokenizers, all stored as a Hugging Face `tokenizer.json`.

* ``char``: one id per character of the training split, sorted by code point (so
  tinyshakespeare gets the same 65 ids as nanoGPT's shakespeare_char). A single ``<unk>``
  id is appended only when asked for (validation text holding characters train lacks).
  Saved as a WordLevel model with a one-character Split pre-tokenizer and a Fuse
  decoder, so ``tokenizers.Tokenizer.from_file`` loads it and round-trips.
* ``bpe``: GPT-2 style byte-level BPE with ``<|endoftext|>`` at id 0, no normalizer and
  no prefix space, so ``decode(encode(text)) == text`` for any text.

* ``hf``: any other tokenizer.json that ``tokenizers`` loads (imported models: Llama's
  SentencePiece-style BPE with byte fallback, SmolLM2's and Qwen's byte-level BPE with their
  own splits and normalizers, WordPiece, Unigram...). Encoded and decoded by ``tokenizers``
  itself, exactly as transformers' PreTrainedTokenizerFast does, with two conventions shared
  with the other kinds: `encode` adds no special tokens (``bos_ids`` holds what the file's
  post-processor puts before a text, e.g. Llama's ``<s>``: generation, eval and data
  preparation add it where transformers' ``tokenizer(text)`` would), and special-token
  strings inside text are plain characters (transformers' ``split_special_tokens=True``).

An imported tokenizer of any kind (SmolLM2's tokenizer.json is GPT-2-shaped, so it is kind
``bpe``) keeps the model's side files beside tokenizer.json: transformers'
``tokenizer_config.json``, the chat template files and generation_config.json (`HF_SIDE_FILES`,
carried byte for byte wherever tokenizer.json goes; import writes them). The end-of-text token
(``eot_id``) is the ``eos_token`` they name (else ``<|endoftext|>`` for char and bpe), ``bos_id``
their ``bos_token`` where the post-processor adds none, ``stop_ids`` adds generation_config.json's
eos_token_id list (Llama 3's), and ``chat_template`` is the model's jinja template.

The package: `pieces` (GPT-2's byte-level split emulated with the stdlib `re`, and the piece cache),
`files` (tokenizer.json's shapes and the side files), `kinds` (one codec per kind), `core` (the
Tokenizer), `stream` (decoding as ids arrive) and `learn` (char and BPE training).
Encoding char and bpe does not go through ``tokenizers`` for whole texts (see `pieces`); ids agree.
"""

from .core import Tokenizer
from .files import (EOT, HF_CONFIG_FILE, HF_GENERATION_FILE, HF_SIDE_FILES, HF_SPECIAL_TOKEN_NAMES, TOKENIZER_FILE,
                    UNK, copy_tokenizer, spec_model_type)
from .learn import MAX_VOCAB, MIN_BPE_VOCAB, scale_counts, train_bpe_from_counts, train_char_tokenizer
from .pieces import index_pieces, split_pieces
from .stream import HFStreamDecoder, StreamDecoder

__all__ = [
    "EOT",
    "UNK",
    "TOKENIZER_FILE",
    "HF_CONFIG_FILE",
    "HF_SIDE_FILES",
    "HF_GENERATION_FILE",
    "HF_SPECIAL_TOKEN_NAMES",
    "MIN_BPE_VOCAB",
    "MAX_VOCAB",
    "Tokenizer",
    "StreamDecoder",
    "HFStreamDecoder",
    "copy_tokenizer",
    "train_char_tokenizer",
    "train_bpe_from_counts",
    "scale_counts",
    "spec_model_type",
    "split_pieces",
    "index_pieces",
]
