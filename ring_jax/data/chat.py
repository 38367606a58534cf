"""Chat template: (system, user, assistant) turns -> token ids + loss mask.

A template is three strings per role, rendered per message as::

    headers[role] + content + ends[role] + separator

and, for generation, the prompt ends with ``headers["assistant"]``. Two presets:

* ``CHATML`` (default; used with the BPE from ring_jax.data.bpe)::

      <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{content}<|im_end|>\\n

* ``LING``: the Ling-lite / Ring-lite (BailingMoe v1) prompt format as used by public serving templates::

      <role>SYSTEM</role>{content}<role>HUMAN</role>{content}<role>ASSISTANT</role>{content}<|endoftext|>

  (no end marker on system/user turns; the assistant turn ends with the eos). Check it against the
  checkpoint's tokenizer_config.json ``chat_template`` before fine-tuning a real checkpoint.

Token ids are built piecewise (header, content, end, separator are encoded separately and concatenated), which
is what makes the loss mask exact: it is 1 on the assistant's content tokens and its end-of-turn tokens, 0 on
everything else (system/user turns, headers, separators). ``decode(ids) == render_text(messages)`` for a lossless
tokenizer, and :meth:`ChatTemplate.jinja` gives a Jinja string (HF ``tokenizer_config.json["chat_template"]``)
that renders the same text. Content containing a special token string is rejected (``ChatFormatError``) so data
cannot inject turn markers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ring_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (bad role, missing/empty content, injected special tokens)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ChatTemplate:
    """Per-role header / end-of-turn strings plus a separator after every turn (see module docstring)."""

    name: str
    headers: Mapping[str, str]
    ends: Mapping[str, str]
    separator: str = ""

    def __post_init__(self):
        for r in ROLES:
            if r not in self.headers or r not in self.ends:
                raise ValueError(f"template {self.name!r} lacks role {r!r}")
        if not self.ends["assistant"]:
            raise ValueError(f"template {self.name!r}: the assistant turn needs a non-empty end-of-turn marker")

    def render_text(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The text form of the conversation (reference for the Jinja template and for ``decode``)."""
        parts = []
        for m in messages:
            role, content = _check_message(m, self)
            parts.append(self.headers[role] + content + self.ends[role] + self.separator)
        if add_generation_prompt:
            parts.append(self.headers["assistant"])
        return "".join(parts)

    def jinja(self) -> str:
        """A Jinja chat template (HF ``apply_chat_template`` conventions) rendering exactly ``render_text``."""

        def d(mapping):
            return "{" + ", ".join(f"{_jinja_str(k)}: {_jinja_str(mapping[k])}" for k in ROLES) + "}"

        return (
            f"{{% set headers = {d(self.headers)} %}}"
            f"{{% set ends = {d(self.ends)} %}}"
            "{% for message in messages %}"
            "{{ headers[message['role']] + message['content'] + ends[message['role']] + "
            f"{_jinja_str(self.separator)} }}}}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ headers['assistant'] }}{% endif %}"
        )


def _jinja_str(s: str) -> str:
    """A single-quoted Jinja string literal for s (Jinja unescapes literals like Python)."""
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


CHATML = ChatTemplate(
    name="chatml",
    headers={r: f"<|im_start|>{r}\n" for r in ROLES},
    ends={r: "<|im_end|>" for r in ROLES},
    separator="\n",
)

LING = ChatTemplate(
    name="ling",
    headers={"system": "<role>SYSTEM</role>", "user": "<role>HUMAN</role>", "assistant": "<role>ASSISTANT</role>"},
    ends={"system": "", "user": "", "assistant": "<|endoftext|>"},
    separator="",
)

TEMPLATES = {t.name: t for t in (CHATML, LING)}


def _check_message(m, template: ChatTemplate) -> tuple[str, str]:
    if not isinstance(m, Mapping):
        raise ChatFormatError(f"message is not an object: {m!r:.80}")
    role, content = m.get("role"), m.get("content")
    if role not in template.headers:
        raise ChatFormatError(f"unknown role {role!r} (expected one of {list(template.headers)})")
    if not isinstance(content, str):
        raise ChatFormatError(f"{role} message content is not a string: {type(content).__name__}")
    if role == "assistant" and not content.strip():
        raise ChatFormatError("empty assistant turn")
    return role, content


def check_messages(messages: object, template: ChatTemplate = CHATML) -> list[tuple[str, str]]:
    """``(role, content)`` of every message, or ChatFormatError: the structural checks :meth:`ChatRenderer.render`
    applies (a non-empty list of ``{role, content}`` with known roles, string contents, no empty assistant turn),
    without a tokenizer, so records can be vetted before the tokenizer exists (e.g. to train one on them)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    return [_check_message(m, template) for m in messages]


class ChatRenderer:
    """Renders conversations to ``(ids, loss_mask)`` with a tokenizer and a :class:`ChatTemplate`.

    ``ids`` and ``loss_mask`` are int32 numpy arrays of equal length; ``loss_mask[i] == 1`` iff token i is part
    of an assistant turn's content or end-of-turn marker (every assistant turn is trained, not only the last).
    """

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate = CHATML):
        self.tokenizer = tokenizer
        self.template = template
        enc = tokenizer.encode
        self._header = {r: enc(template.headers[r]) for r in ROLES}
        self._end = {r: enc(template.ends[r]) if template.ends[r] else [] for r in ROLES}
        self._sep = enc(template.separator) if template.separator else []
        self._special_ids = np.asarray(tokenizer.text_special_ids(), dtype=np.int64)
        eot = self._end["assistant"]
        if not eot:
            raise ValueError(f"assistant end-of-turn {template.ends['assistant']!r} encodes to no tokens")

    @property
    def stop_ids(self) -> list[int]:
        """Token ids ending an assistant turn (a sampler stops when it has generated them)."""
        return list(self._end["assistant"])

    def _content_ids(self, role: str, content: str) -> list[int]:
        ids = self.tokenizer.encode(content) if content else []
        if len(self._special_ids) and ids and np.isin(np.asarray(ids), self._special_ids).any():
            raise ChatFormatError(f"{role} content contains a special token string")
        return ids

    def render(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(ids, loss_mask)`` (int32 arrays) for a conversation.

        Raises:
          ChatFormatError: empty conversation, unknown role, non-string content, empty assistant turn, or content
            containing a special token.
        """
        ids: list[int] = []
        mask: list[int] = []
        for role, content in check_messages(messages, self.template):
            trained = 1 if role == "assistant" else 0
            body = self._content_ids(role, content) + self._end[role]
            ids += self._header[role]
            mask += [0] * len(self._header[role])
            ids += body
            mask += [trained] * len(body)
            ids += self._sep
            mask += [0] * len(self._sep)
        if add_generation_prompt:
            ids += self._header["assistant"]
            mask += [0] * len(self._header["assistant"])
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int32)

    def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> np.ndarray:
        """Prompt ids for generation: the conversation followed by the assistant header (int32 array)."""
        return self.render(messages, add_generation_prompt=True)[0]

    def render_text(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        return self.template.render_text(messages, add_generation_prompt)


def render(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    template: ChatTemplate = CHATML,
    add_generation_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Functional form of :meth:`ChatRenderer.render` (re-encodes the template pieces on every call)."""
    return ChatRenderer(tokenizer, template).render(messages, add_generation_prompt)


def render_prompt(
    messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, template: ChatTemplate = CHATML
) -> np.ndarray:
    """Functional form of :meth:`ChatRenderer.render_prompt`."""
    return ChatRenderer(tokenizer, template).render_prompt(messages)
