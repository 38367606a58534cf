"""A toy SFT corpus of arithmetic problems with worked, long-CoT-style solutions, so the SFT CLI runs with no data.

Records are ``{"prompt": ..., "response": ...}`` (the chat form ring_jax.data.jsonl reads).  Deterministic for a
given ``seed``: every process of a multi-host run generates the same corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from ring_jax.data.chat import ChatFormatError, check_messages
from ring_jax.data.jsonl import RecordError, record_to_messages


def _add(a: int, b: int) -> str:
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry, digits = [], 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(
            f"{x} + {y}"
            + (f" + {carry}" if carry else "")
            + f" = {s}, write {s % 10}"
            + (" carry 1" if s >= 10 else "")
        )
        carry, digits = s // 10, digits + [str(s % 10)]
    if carry:
        steps.append("write the final carry 1")
        digits.append("1")
    return "Add digit by digit from the right. " + "; ".join(steps) + f". So {a} + {b} = {a + b}."


def _sub(a: int, b: int) -> str:
    if a < b:
        return f"{a} is smaller than {b}, so compute {b} - {a} and negate. " + _sub(b, a).replace(
            f"So {b} - {a} = {b - a}.", f"So {b} - {a} = {b - a}, and {a} - {b} = {a - b}."
        )
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(da)):
        x = int(da[i]) - borrow
        y = int(db[i]) if i < len(db) else 0
        if x < y:
            steps.append(f"{x} < {y}, borrow: {x + 10} - {y} = {x + 10 - y}")
            borrow = 1
        else:
            steps.append(f"{x} - {y} = {x - y}")
            borrow = 0
    return "Subtract digit by digit from the right. " + "; ".join(steps) + f". So {a} - {b} = {a - b}."


def _mul(a: int, b: int) -> str:
    parts = []
    for i, d in enumerate(str(b)[::-1]):
        p = a * int(d) * 10**i
        parts.append(f"{a} x {d}" + (f" x {10**i}" if i else "") + f" = {p}")
    total = a * b
    return (
        "Split the second factor into digits. "
        + "; ".join(parts)
        + f". Add the partial products: {' + '.join(str(a * int(d) * 10**i) for i, d in enumerate(str(b)[::-1]))}"
        + f" = {total}. So {a} x {b} = {total}."
    )


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` records: addition, subtraction and multiplication with worked solutions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        op = int(rng.integers(3))
        if op == 0:
            a, b = (int(x) for x in rng.integers(1, 10 ** int(rng.integers(1, 5)), size=2))
            q, r = f"What is {a} + {b}?", _add(a, b)
        elif op == 1:
            a, b = (int(x) for x in rng.integers(1, 10 ** int(rng.integers(1, 5)), size=2))
            q, r = f"What is {a} - {b}?", _sub(a, b)
        else:
            a, b = int(rng.integers(2, 1000)), int(rng.integers(2, 100))
            q, r = f"What is {a} x {b}?", _mul(a, b)
        out.append({"prompt": q, "response": r + " The answer is " + r.rsplit("= ", 1)[1].rstrip(".,") + "."})
    return out


def write_jsonl(records: Iterable[Any], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def corpus_texts(records: Iterable[Any]) -> list[str]:
    """Strings to train a tokenizer on: the message contents of every record the SFT reader accepts (the same
    ``record_to_messages`` + chat-template checks; any value ``iter_records`` yields may be passed).  A bad record
    is left out here without a word: the reader skips, counts and reports it (file:line) when it loads the data
    with the tokenizer, so each bad line is reported once, with or without --tokenizer."""
    texts = []
    for r in records:
        try:
            texts.extend(content for _, content in check_messages(record_to_messages(r)))
        except (RecordError, ChatFormatError):
            continue
    return texts


__all__ = ["arithmetic_records", "corpus_texts", "write_jsonl"]
