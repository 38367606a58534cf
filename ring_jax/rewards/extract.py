"""Answer-extraction helpers shared by the reward functions (plain Python, no deps).

* `last_boxed(text)`        -> content of the LAST ``\\boxed{...}`` (balanced, nested braces ok) or None
* `last_answer_tag(text)`   -> content of the LAST ``<answer>...</answer>`` or None
* `strip_thinking(text)`    -> the part of a response after the last ``</think>`` (whole text if none)
"""

from __future__ import annotations

import re

_BOXED_RE = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _balanced_from(text: str, open_idx: int) -> str | None:
    """Content between text[open_idx] == '{' and its matching '}', or None if unbalanced.

    LaTeX-escaped braces (``\\{``, ``\\}``) do not count towards the nesting depth.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in `text`.

    Only the last occurrence is considered: if it is unterminated (e.g. a truncated generation)
    the answer is None rather than an earlier box (the model's final word was not given).
    """
    if not text:
        return None
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    content = _balanced_from(text, m.end() - 1)
    return None if content is None else content.strip()


def last_answer_tag(text: str) -> str | None:
    """Stripped content of the last ``<answer>...</answer>`` tag (case-insensitive), or None."""
    if not text:
        return None
    matches = _ANSWER_TAG_RE.findall(text)
    if not matches:
        return None
    return matches[-1].strip()


def strip_thinking(text: str) -> str:
    """The final-answer part of a reasoning response: text after the last ``</think>``."""
    if not text:
        return ""
    idx = text.rfind("</think>")
    return text if idx < 0 else text[idx + len("</think>") :]
