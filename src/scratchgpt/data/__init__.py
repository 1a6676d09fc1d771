"""Data, in pipeline order: raw text (`inputs`: text, JSONL, parquet, datasets folders, compressed)
-> `prepare` (clean, train a tokenizer, encode; or one part of a corpus, then `merge_parts`) -> a
prepared directory -> `TokenDataset` batches (and MLM masking) for training; `readers` parse the
labelled and conversational files that fine-tuning and evaluation take.

A prepared data directory holds:
  train.bin, val.bin   flat token ids, little-endian uint16 (vocab <= 65536) or uint32; a long
                       split is shards train-00000.bin, train-00001.bin, ... (see shards.py)
  tokenizer.json       see scratchgpt.tokenizer
  meta.json            manifest: counts, dtype, shards, cleaning report, sha256s, settings
"""

from .dataset import (META_FILE, SPLITS, TokenDataset, data_info, dtype_for_vocab, load_meta, load_tokenizer,
                      split_shards, split_tokens)
from .masking import mlm_mask_batch
from .merge import merge_parts
from .prepare import PrepareConfig, default_data_dir, prepare
from .shards import ShardedTokens

__all__ = ["META_FILE", "SPLITS", "PrepareConfig", "ShardedTokens", "TokenDataset", "data_info", "default_data_dir",
           "dtype_for_vocab", "load_meta", "load_tokenizer", "merge_parts", "mlm_mask_batch", "prepare",
           "split_shards", "split_tokens"]
