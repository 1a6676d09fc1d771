"""Fine-tuning a trained run, in pipeline order: the shared loop (loop.py), classification
(classify.py: `finetune classify`, `predict`), supervised fine-tuning (sft.py: `finetune sft`),
and folding LoRA adapters into full weights (merge.py: `merge-lora`).

    scratchgpt finetune classify RUN --train FILE --val FILE --out RUN2 [--lora | --freeze-except N]
    scratchgpt finetune sft RUN --train FILE --val FILE --out RUN2 [--lora] [--pack] [--no-mask-prompt]
    scratchgpt predict RUN2 --input FILE [--output FILE]
    scratchgpt merge-lora RUN2 --out RUN3
"""

from .classify import ClassifyOptions, finetune_classify, predict, train_classifier
from .loop import FinetuneOptions, fit, setup_trainable
from .merge import merge_lora
from .sft import SFTOptions, build_sft_examples, finetune_sft, pack_rows, sft_labels, sft_loss, train_sft

__all__ = ["ClassifyOptions", "FinetuneOptions", "SFTOptions", "build_sft_examples", "finetune_classify",
           "finetune_sft", "fit", "merge_lora", "pack_rows", "predict", "setup_trainable", "sft_labels", "sft_loss",
           "train_classifier", "train_sft"]
