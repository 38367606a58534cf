"""JSONL readers for SFT conversations and RL prompts, with counted, logged skipping of bad records.

Sources (``source`` arguments) may be: a path to a ``.jsonl`` file, a directory (all ``*.jsonl`` in it, sorted),
a glob pattern, a list of such paths, or an in-memory list of dict records (then "line" = 1-based index and
the file name is ``<records>``). Blank lines are ignored (not counted).

SFT records (one per line), either::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    {"prompt": str, "response": str, "system": str (optional)}

RL prompt records: any object with a non-empty string ``"task"`` and either ``"prompt"`` (a non-empty string
or a messages list) or ``"prompt_ids"`` (non-empty list of ints); all other fields (answers, test cases ...)
are kept.

A bad record (invalid JSON, not an object, missing fields, bad messages, empty assistant turn, no assistant
turn, too many tokens) is skipped, counted in :class:`ReadStats` by reason, and logged as a warning naming
file and line (the first ``MAX_LOGGED`` per load). If more than ``max_bad_fraction`` of the records are bad,
or none is good, :class:`DataError` is raised after reading.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ring_jax.data.chat import CHATML, ChatFormatError, ChatRenderer, ChatTemplate

if TYPE_CHECKING:
    from ring_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.05
MAX_LOGGED = 20  # individual warnings per load; the rest only counted
MAX_KEPT = 1000  # bad record locations kept in ReadStats.bad_records
IN_MEMORY = "<records>"


class DataError(RuntimeError):
    """The data source is unusable (too many bad records, nothing usable, missing files)."""


class RecordError(ValueError):
    """One bad record; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class ReadStats:
    """Counts of one load. ``bad_records`` holds (file, line, reason) for the first ``MAX_KEPT`` bad records."""

    total: int = 0
    good: int = 0
    bad: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad_records: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def add_good(self) -> None:
        self.total += 1
        self.good += 1

    def add_bad(self, origin: str, line: int, err: RecordError) -> None:
        self.total += 1
        self.bad += 1
        self.reasons[err.reason] += 1
        if len(self.bad_records) < MAX_KEPT:
            self.bad_records.append((origin, line, err.reason))
        if self.bad <= MAX_LOGGED:
            log.warning("skipping bad record %s:%d: %s", origin, line, err)
            if self.bad == MAX_LOGGED:
                log.warning("further bad records are counted but not logged")

    def check(self, max_bad_fraction: float, what: str) -> None:
        """Raises DataError if the load is unusable."""
        where = ", ".join(f"{f}:{n}" for f, n, _ in self.bad_records[:5])
        summary = f"{self.bad}/{self.total} bad {what} records ({dict(self.reasons)}; first at {where or '-'})"
        if self.good == 0:
            raise DataError(f"no usable {what} records: {summary}")
        if self.bad_fraction > max_bad_fraction:
            raise DataError(
                f"{summary}: bad fraction {self.bad_fraction:.3%} exceeds max_bad_fraction={max_bad_fraction}"
            )
        if self.bad:
            log.warning("%s", summary)


def resolve_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands a file / directory / glob / list of them into a sorted list of files (DataError if none)."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    out: list[str] = []
    for item in items:
        p = os.fspath(item)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.jsonl")))
        elif any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
        elif os.path.isfile(p):
            found = [p]
        else:
            raise DataError(f"data file {p!r} does not exist")
        if not found:
            raise DataError(f"no .jsonl files match {p!r}")
        out += found
    return out


def iter_records(source: str | os.PathLike | Iterable[Any], origin: str = IN_MEMORY) -> Iterator[tuple[str, int, Any]]:
    """Yields ``(origin, line, obj)``; obj is the parsed JSON value or a RecordError for invalid JSON.  In-memory
    records are named ``origin`` (default ``<records>``) and their 1-based index."""
    if not isinstance(source, (str, bytes, os.PathLike)):
        source = list(source)
    if not isinstance(source, (str, bytes, os.PathLike)) and not all(
        isinstance(r, (str, os.PathLike)) for r in source
    ):  # in-memory records (any element that is not a path)
        for i, rec in enumerate(source, start=1):
            yield origin, i, rec
        return
    for path in resolve_paths(source):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield path, lineno, RecordError("bad_utf8", str(e))
                    continue
                if not line.strip():
                    continue
                try:
                    yield path, lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield path, lineno, RecordError("bad_json", str(e))


# ---------------------------------------------------------------------------------------------------------
# SFT


def record_to_messages(rec: Any) -> list[dict[str, str]]:
    """An SFT record -> messages list (RecordError if the schema does not match)."""
    if not isinstance(rec, Mapping):
        raise RecordError("not_object", type(rec).__name__)
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError("bad_messages", "'messages' must be a non-empty list")
        return msgs
    if "prompt" in rec and "response" in rec:
        msgs = []
        if rec.get("system"):
            msgs.append({"role": "system", "content": rec["system"]})
        msgs.append({"role": "user", "content": rec["prompt"]})
        msgs.append({"role": "assistant", "content": rec["response"]})
        return msgs
    raise RecordError("missing_fields", "need 'messages' or 'prompt' + 'response'")


def sft_example(rec: Any, renderer: ChatRenderer, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One SFT record -> (ids, loss_mask); RecordError if it is unusable."""
    msgs = record_to_messages(rec)
    try:
        ids, mask = renderer.render(msgs)
    except ChatFormatError as e:
        reason = "empty_assistant" if "empty assistant" in str(e) else "bad_messages"
        raise RecordError(reason, str(e)) from None
    if not mask.any():
        raise RecordError("no_assistant_turn")
    if max_tokens is not None and ids.size > max_tokens:
        raise RecordError("too_long", f"{ids.size} tokens > {max_tokens}")
    return ids, mask


def load_sft_examples(
    source: str | os.PathLike | Iterable[Any],
    tokenizer: Tokenizer,
    template: ChatTemplate = CHATML,
    max_tokens: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], ReadStats]:
    """Reads + tokenizes SFT records -> ``([(ids, loss_mask), ...], stats)`` (int32 arrays).

    Records longer than ``max_tokens`` (None: no limit) are bad ("too_long"). Raises DataError per module doc.
    """
    renderer = ChatRenderer(tokenizer, template)
    stats = ReadStats()
    out = []
    for origin, line, rec in iter_records(source):
        try:
            if isinstance(rec, RecordError):
                raise rec
            out.append(sft_example(rec, renderer, max_tokens))
            stats.add_good()
        except RecordError as e:
            stats.add_bad(origin, line, e)
    stats.check(max_bad_fraction, "SFT")
    return out, stats


# ---------------------------------------------------------------------------------------------------------
# RL prompts


def check_prompt_record(rec: Any) -> None:
    """RecordError unless rec is a valid RL prompt record."""
    if not isinstance(rec, Mapping):
        raise RecordError("not_object", type(rec).__name__)
    task = rec.get("task")
    if not isinstance(task, str) or not task:
        raise RecordError("missing_task", "need a non-empty string 'task'")
    if "prompt_ids" in rec:
        ids = rec["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise RecordError("bad_prompt", "'prompt_ids' must be a non-empty list of ints")
    elif "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise RecordError("bad_prompt", "empty 'prompt'")
        elif not isinstance(p, list) or not p:
            raise RecordError("bad_prompt", "'prompt' must be a string or a non-empty messages list")
    else:
        raise RecordError("missing_prompt", "need 'prompt' or 'prompt_ids'")


def prompt_messages(rec: Mapping) -> list[dict[str, str]]:
    """The chat messages of a prompt record (a string prompt becomes one user message)."""
    p = rec["prompt"]
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


def load_prompt_records(
    source: str | os.PathLike | Iterable[Any],
    tokenizer: Tokenizer | None = None,
    template: ChatTemplate = CHATML,
    max_prompt_tokens: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    *,
    known_tasks: Collection[str] | None = None,
    too_long_hint: str = "",
    origin: str = IN_MEMORY,
) -> tuple[list[dict], ReadStats]:
    """Reads RL prompt records -> ``(records, stats)``.

    With a tokenizer, each returned record is a shallow copy with ``"prompt_ids"`` (list[int]) filled in when
    absent: the chat-rendered prompt ending with the assistant header (``ChatRenderer.render_prompt``). Prompts
    longer than ``max_prompt_tokens`` are bad ("too_long"; needs a tokenizer unless prompt_ids are given;
    ``too_long_hint`` is appended to their message, e.g. what the limit leaves room for).  With ``known_tasks``,
    a record whose task is not among them is bad ("unknown_task": nothing could score its responses).
    ``origin`` names in-memory records in the messages.
    """
    renderer = ChatRenderer(tokenizer, template) if tokenizer is not None else None
    stats = ReadStats()
    out = []
    for where, line, rec in iter_records(source, origin):
        try:
            if isinstance(rec, RecordError):
                raise rec
            check_prompt_record(rec)
            if known_tasks is not None and rec["task"] not in known_tasks:
                raise RecordError(
                    "unknown_task",
                    f"no reward function for task {rec['task']!r} (registered: {', '.join(sorted(known_tasks))})",
                )
            rec = dict(rec)
            if renderer is not None and "prompt_ids" not in rec:
                try:
                    rec["prompt_ids"] = renderer.render_prompt(prompt_messages(rec)).tolist()
                except ChatFormatError as e:
                    raise RecordError("bad_prompt", str(e)) from None
            n = len(rec["prompt_ids"]) if "prompt_ids" in rec else None
            if max_prompt_tokens is not None and n is not None and n > max_prompt_tokens:
                raise RecordError("too_long", f"{n} prompt tokens > {max_prompt_tokens}{too_long_hint}")
            out.append(rec)
            stats.add_good()
        except RecordError as e:
            stats.add_bad(where, line, e)
    stats.check(max_bad_fraction, "prompt")
    return out, stats
