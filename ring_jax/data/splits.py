"""Train / held-out splits that hold by construction, and the overlap check for prompt files.

A problem's key is what makes two records the same problem: for the procedural task families (reasoning-gym chain
sums and countdown) the generator's parameters, read from the record's ``gym`` metadata; for any other record its
canonical prompt text.  ``is_held_out`` puts a key on one side by a hash of the key alone, so no seed, family or
record count can move a problem across; ``overlap`` finds eval records whose key or canonical text also occurs in
training records (user-supplied files, where the split was made elsewhere).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HELD_OUT_FRACTION = 0.3  # share of each problem space on the held-out side


def canonical_text(text: str) -> str:
    """Prompt text compared across splits: case and runs of white space do not make a new question."""
    return " ".join(text.lower().split())


def prompt_text(record: dict) -> str:
    """The question of a prompt record: ``prompt`` (a string, or chat messages), else the user turns of
    ``messages`` (an SFT record)."""
    p = record.get("prompt")
    if isinstance(p, str):
        return p
    msgs = p if isinstance(p, list) else record.get("messages", [])
    return "\n".join(m.get("content", "") for m in msgs if isinstance(m, dict) and m.get("role") == "user")


def problem_key(record: dict) -> str:
    """The generator's parameters of a procedural task record, as text, else its canonical prompt text.  Countdown's
    numbers are a multiset: "Use 3 7 5" and "Use 5 3 7" with one target are one problem."""
    meta = ((record.get("gym") or {}).get("entry") or {}).get("metadata") or {}
    if record.get("task") == "countdown" and "numbers" in meta and "target" in meta:
        return f"countdown:{','.join(str(n) for n in sorted(meta['numbers']))}->{meta['target']}"
    if record.get("task") == "arithmetic" and "expression" in meta:
        return "chain_sum:" + " ".join(str(meta["expression"]).split())
    return "text:" + canonical_text(prompt_text(record))


def is_held_out(key: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether a problem key is on the held-out side: a hash of the key alone."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h < fraction * 2.0**64


def overlap(train: Iterable[dict], held_out: Sequence[dict]) -> list[int]:
    """Indices of ``held_out`` records that share a problem key or a canonical prompt text with any ``train``
    record."""
    keys, texts = set(), set()
    for r in train:
        keys.add(problem_key(r))
        texts.add(canonical_text(prompt_text(r)))
    return [i for i, r in enumerate(held_out) if problem_key(r) in keys or canonical_text(prompt_text(r)) in texts]
