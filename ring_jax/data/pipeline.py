"""grain input pipelines for SFT (packed token rows) and RL (prompt records).

Both pipelines load the whole (small) corpus into memory on every process, so every process computes the
same rows in the same order, then::

    grain.MapDataset.source(rows)
      .shuffle(seed)                              # global permutation, reshuffled every epoch
      .slice(:n - n % shard_count)                # equal shard sizes (drop_remainder sharding)
      .slice(shard_index::shard_count)            # this process's disjoint shard
      .repeat(num_epochs)                         # None = forever
      .batch(batch_size // shard_count, drop_remainder=True)
      .to_iter_dataset(ReadOptions(num_threads=0))

``batch_size`` is the GLOBAL batch size; each process yields ``batch_size // shard_count`` rows per step (its
slice of the global batch) and every process yields the same number of steps. All processes must pass the
same ``seed``. The iterator is a ``grain.DatasetIterator``: ``state = it.get_state()`` (a small JSON-able dict)
and ``it.set_state(state)`` on an iterator of an identically-built dataset resumes at exactly the next batch.
No worker processes are used (rows are in memory; nothing to parallelise).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

from ring_jax.data.chat import CHATML, ChatTemplate
from ring_jax.data.jsonl import (
    DEFAULT_MAX_BAD_FRACTION,
    DataError,
    ReadStats,
    load_prompt_records,
    load_sft_examples,
)
from ring_jax.data.packing import PackStats, pack

if TYPE_CHECKING:
    from ring_jax.data.tokenizer import Tokenizer


def default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(jax.process_index(), jax.process_count()) for whichever of the two is None."""
    if shard_index is None or shard_count is None:
        import jax  # only for the process topology

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
    return int(shard_index), int(shard_count)


@dataclasses.dataclass
class ShardInfo:
    num_items: int  # items (rows / records) in the whole dataset, before sharding
    items_per_shard: int  # per epoch, after dropping the remainder of num_items % shard_count
    per_process_batch_size: int
    num_batches: int | None  # batches this process will yield in total (None: infinite)
    shard_index: int
    shard_count: int


def shard_shuffle_batch(
    items: Sequence,
    batch_size: int,
    seed: int,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
    batch_fn: Callable | None = None,
    shuffle: bool = True,
    read_options: grain.ReadOptions | None = None,
) -> tuple[grain.IterDataset, ShardInfo]:
    """The common grain chain (module docstring) over an in-memory random-access sequence."""
    if batch_size <= 0 or batch_size % shard_count:
        raise ValueError(f"global batch_size={batch_size} must be a positive multiple of shard_count={shard_count}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    per_process = batch_size // shard_count
    n = len(items)
    n_even = n - n % shard_count
    per_shard = n_even // shard_count
    if per_shard < per_process:
        raise DataError(
            f"{n} items over {shard_count} shards gives {per_shard} per shard, fewer than one batch of {per_process}"
        )
    ds = grain.MapDataset.source(items)
    if shuffle:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    if n_even != n:
        ds = ds.slice(slice(0, n_even))
    if shard_count > 1:
        ds = ds.slice(slice(shard_index, None, shard_count))
    ds = ds.repeat(num_epochs)
    ds = ds.batch(per_process, drop_remainder=True, batch_fn=batch_fn)
    read_options = read_options or grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    info = ShardInfo(
        num_items=n,
        items_per_shard=per_shard,
        per_process_batch_size=per_process,
        num_batches=None if num_epochs is None else (num_epochs * per_shard) // per_process,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    return ds.to_iter_dataset(read_options), info


# ---------------------------------------------------------------------------------------------------------
# SFT


@dataclasses.dataclass
class SFTDataInfo:
    read_stats: ReadStats
    pack_stats: PackStats
    shard: ShardInfo


def make_sft_dataset(
    source: str | os.PathLike | Iterable[Any],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    *,
    template: ChatTemplate = CHATML,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    skip_overlength: bool = True,
    packing: str = "best_fit",
    read_options: grain.ReadOptions | None = None,
) -> tuple[grain.IterDataset, SFTDataInfo]:
    """Builds the packed SFT dataset; see :func:`sft_dataset`. Returns ``(grain.IterDataset, SFTDataInfo)``."""
    shard_index, shard_count = default_shard(shard_index, shard_count)
    examples, read_stats = load_sft_examples(
        source,
        tokenizer,
        template=template,
        max_tokens=seq_len if skip_overlength else None,
        max_bad_fraction=max_bad_fraction,
    )
    # Document order for packing: a seeded permutation, so rows mix documents from the whole corpus.
    order = np.random.default_rng(seed).permutation(len(examples))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows, pack_stats = pack([examples[i] for i in order], seq_len, pad_id=pad_id, method=packing)
    ds, shard = shard_shuffle_batch(
        rows, batch_size, seed, num_epochs, shard_index, shard_count, read_options=read_options
    )
    return ds, SFTDataInfo(read_stats=read_stats, pack_stats=pack_stats, shard=shard)


def sft_dataset(
    source: str | os.PathLike | Iterable[Any],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    **kwargs: Any,
) -> grain.DatasetIterator:
    """Iterator of packed SFT batches for this process.

    Each batch is a dict of int32 arrays ``[batch_size // shard_count, seq_len]`` with keys ``tokens``,
    ``targets``, ``loss_mask``, ``segment_ids``, ``positions`` (layout: ring_jax.data.packing).

    Args:
      source: JSONL path(s) / directory / glob, or a list of dict records (ring_jax.data.jsonl).
      tokenizer: a ring_jax.data.tokenizer.Tokenizer.
      seq_len: row length.
      batch_size: GLOBAL batch size (multiple of shard_count).
      seed: shuffling seed (same on every process).
      num_epochs: passes over the rows; None = infinite.
      shard_index / shard_count: default ``jax.process_index()`` / ``jax.process_count()``.
      **kwargs: template, max_bad_fraction, skip_overlength (True: records > seq_len tokens are skipped as bad;
        False: truncated by the packer), packing ("best_fit" | "sequential"), read_options.
    """
    ds, _ = make_sft_dataset(
        source, tokenizer, seq_len, batch_size, seed, num_epochs, shard_index, shard_count, **kwargs
    )
    return iter(ds)


# ---------------------------------------------------------------------------------------------------------
# RL prompts


def _as_list(records):
    return list(records)


def make_prompt_dataset(
    source: str | os.PathLike | Iterable[Any],
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    template: ChatTemplate = CHATML,
    max_prompt_tokens: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    shuffle: bool = True,
    read_options: grain.ReadOptions | None = None,
) -> tuple[grain.IterDataset, ReadStats, ShardInfo]:
    """Builds the RL prompt dataset; see :func:`prompt_dataset`.

    Returns ``(grain.IterDataset, ReadStats, ShardInfo)``."""
    shard_index, shard_count = default_shard(shard_index, shard_count)
    records, stats = load_prompt_records(
        source,
        tokenizer=tokenizer,
        template=template,
        max_prompt_tokens=max_prompt_tokens,
        max_bad_fraction=max_bad_fraction,
    )
    ds, shard = shard_shuffle_batch(
        records,
        batch_size,
        seed,
        num_epochs,
        shard_index,
        shard_count,
        batch_fn=_as_list,
        shuffle=shuffle,
        read_options=read_options,
    )
    return ds, stats, shard


def prompt_dataset(
    source: str | os.PathLike | Iterable[Any],
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    **kwargs: Any,
) -> grain.DatasetIterator:
    """Iterator of RL prompt batches for this process: each batch is a list of ``batch_size // shard_count``
    record dicts (ring_jax.data.jsonl.load_prompt_records; with ``tokenizer=`` they carry ``prompt_ids``).

    kwargs: tokenizer, template, max_prompt_tokens, max_bad_fraction, shuffle, read_options.
    Checkpointable like :func:`sft_dataset` (``get_state`` / ``set_state``).
    """
    ds, _, _ = make_prompt_dataset(source, batch_size, seed, num_epochs, shard_index, shard_count, **kwargs)
    return iter(ds)
