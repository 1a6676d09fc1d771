"""Data, in pipeline order: raw text -> `prepare` (clean, train a tokenizer, encode) -> a prepared
directory -> `TokenDataset` batches (and MLM masking) for training; `readers` parse the labelled
and conversational files that fine-tuning and evaluation take.

A prepared data directory holds:
  train.bin, val.bin   flat token ids, little-endian uint16 (vocab <= 65536) or uint32
  tokenizer.json       see scratchgpt.tokenizer
  meta.json            manifest: counts, dtype, cleaning report, sha256s, settings
"""

from .dataset import META_FILE, SPLITS, TokenDataset, data_info, dtype_for_vocab, load_meta, load_tokenizer
from .masking import mlm_mask_batch
from .prepare import PrepareConfig, default_data_dir, prepare

__all__ = ["META_FILE", "SPLITS", "PrepareConfig", "TokenDataset", "data_info", "default_data_dir", "dtype_for_vocab", "load_meta",
           "load_tokenizer", "mlm_mask_batch", "prepare"]
