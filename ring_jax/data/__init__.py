"""Data: tokenizers, chat template, JSONL sources, packing and grain pipelines.

Independent of the model code (numpy + grain + tokenizers/sentencepiece only). Names are re-exported lazily
so that e.g. ``from ring_jax.data import load_tokenizer`` does not import grain.
"""

import importlib

_EXPORTS = {
    "tokenizer": ("Tokenizer", "HFTokenizer", "SentencePieceTokenizer", "load_tokenizer"),
    "bpe": ("train_bpe", "DEFAULT_SPECIAL_TOKENS"),
    "chat": (
        "ChatTemplate",
        "ChatRenderer",
        "ChatFormatError",
        "check_messages",
        "CHATML",
        "LING",
        "TEMPLATES",
        "render",
        "render_prompt",
    ),
    "jsonl": ("DataError", "ReadStats", "load_sft_examples", "load_prompt_records"),
    "packing": ("pack", "PackedRows", "PackStats"),
    "pipeline": (
        "sft_dataset",
        "make_sft_dataset",
        "prompt_dataset",
        "make_prompt_dataset",
        "SFTDataInfo",
        "ShardInfo",
    ),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
