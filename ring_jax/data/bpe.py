"""Train a small byte-level BPE tokenizer (for demos/tests; real runs load the checkpoint's tokenizer.json).

Special tokens (fixed ids, in this order):

  ====  ===================  ====================================================
  id    token                use
  ====  ===================  ====================================================
  0     ``<|pad|>``          padding (pad_id)
  1     ``<|endoftext|>``    end of document (eos_id)
  2     ``<|im_start|>``     start of a chat turn (ChatML, see ring_jax.data.chat)
  3     ``<|im_end|>``       end of a chat turn (the assistant's stop token)
  ====  ===================  ====================================================

Byte-level: every UTF-8 byte is in the initial alphabet, so any string round-trips exactly
(``decode(encode(s)) == s``) even with characters never seen in training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ring_jax.data.chat import CHATML
from ring_jax.data.tokenizer import HFTokenizer

PAD = "<|pad|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, IM_START, IM_END)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    split_digits: bool = True,
) -> HFTokenizer:
    """Trains a byte-level BPE tokenizer on ``texts``; deterministic for a given input.

    Args:
      texts: training strings (consumed once).
      vocab_size: final vocabulary size including the 256 byte symbols and the special tokens (the trainer may
        stop earlier if no pair occurs ``min_frequency`` times).
      special_tokens: atomic tokens given ids 0..len-1 in order. The first is the pad token and the second the
        eos token when the defaults are used; bos is None (the ChatML template needs none).
      min_frequency: minimum pair count for a merge.
      split_digits: every digit is its own pre-token, so no merge ever joins digits (as LLaMA's and Qwen's
        tokenizers do). Numbers then share one small set of digit tokens and a small model can learn carrying,
        instead of memorising a table of multi-digit tokens (see BUILD_NOTES, "digits").

    Returns:
      An :class:`HFTokenizer` whose ``chat_template`` is the ChatML Jinja string.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"duplicate special tokens: {special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} < {len(alphabet)} byte symbols + {len(special_tokens)} special tokens"
        )

    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=special_tokens,
        initial_alphabet=sorted(alphabet),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(special_tokens):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))

    def maybe(name):
        return tok.token_to_id(name) if name in special_tokens else None

    return HFTokenizer(tok, bos_id=None, eos_id=maybe(EOS), pad_id=maybe(PAD), chat_template=CHATML.jinja())
