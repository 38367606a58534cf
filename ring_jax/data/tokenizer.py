"""One tokenizer interface over two backends.

* :class:`HFTokenizer` wraps a Hugging Face ``tokenizer.json`` (the `tokenizers` library; this is what
  Ling/Ring-lite checkpoints ship and what :func:`ring_jax.data.bpe.train_bpe` produces).
* :class:`SentencePieceTokenizer` wraps a sentencepiece ``.model`` file.

``encode`` never adds BOS/EOS: the chat template and the packer decide where special tokens go.
Special-token strings that appear in the text (e.g. ``<|im_end|>``) are parsed as their single special id
by both backends (HF "added tokens", sentencepiece ``user_defined_symbols``).

:func:`load_tokenizer` picks the backend from the path; ``tokenizer_config.json`` next to a
``tokenizer.json`` / ``tokenizer.model`` (HF layout) supplies bos/eos/pad and ``chat_template``.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sentencepiece
    import tokenizers

# Names tried (in order) when no tokenizer_config.json says which token is bos / eos / pad.
_BOS_CANDIDATES = ("<|startoftext|>", "<s>", "<bos>", "[CLS]")
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SP_MODEL = "tokenizer.model"


class Tokenizer(abc.ABC):
    """Backend-independent tokenizer interface.

    Attributes:
      bos_id / eos_id / pad_id: ids of the special tokens, or None when the vocabulary has none.
      chat_template: a Jinja chat template string (HF ``tokenizer_config.json`` style) or None.
    """

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (including special tokens)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text. With skip_special_tokens=False, ``decode(encode(s)) == s`` for a lossless tokenizer."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a single vocabulary entry (e.g. a special token), or None if absent."""

    @abc.abstractmethod
    def id_to_token(self, idx: int) -> str | None:
        """Vocabulary entry of an id, or None."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> list[str]:
        """All special (atomic, never split) token strings."""

    def text_special_ids(self) -> list[int]:
        """Ids that ``encode`` produces for special-token strings found in text (used to reject injected markers)."""
        return sorted({i for i in (self.token_to_id(t) for t in self.special_tokens) if i is not None})

    @abc.abstractmethod
    def save(self, directory: str, chat_template: str | None = None) -> None:
        """Writes the tokenizer files + ``tokenizer_config.json`` (special tokens, chat template) into directory."""

    # -- shared helpers ---------------------------------------------------------------------------------------

    def require_id(self, token: str) -> int:
        idx = self.token_to_id(token)
        if idx is None:
            raise ValueError(f"token {token!r} is not in the tokenizer vocabulary")
        return idx

    def _config_dict(self, chat_template: str | None) -> dict:
        def tok(i):
            return None if i is None else self.id_to_token(i)

        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok(self.bos_id),
            "eos_token": tok(self.eos_id),
            "pad_token": tok(self.pad_id),
            "additional_special_tokens": [
                t for t in self.special_tokens if t not in (tok(self.bos_id), tok(self.eos_id), tok(self.pad_id))
            ],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        template = chat_template if chat_template is not None else self.chat_template
        if template is not None:
            cfg["chat_template"] = template
        return cfg

    def _apply_config(self, cfg: dict) -> None:
        """Sets bos/eos/pad/chat_template from a tokenizer_config.json dict (missing keys -> heuristics)."""
        for attr, key, candidates in (
            ("bos_id", "bos_token", _BOS_CANDIDATES),
            ("eos_id", "eos_token", _EOS_CANDIDATES),
            ("pad_id", "pad_token", _PAD_CANDIDATES),
        ):
            if key in cfg:
                value = cfg[key]
                if isinstance(value, dict):  # HF AddedToken serialisation
                    value = value.get("content")
                setattr(self, attr, None if value is None else self.token_to_id(value))
            elif getattr(self, attr, None) is None:
                setattr(self, attr, _first_present(self, candidates))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF allows [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        if template is not None:
            self.chat_template = template


def _first_present(tok: Tokenizer, candidates: Sequence[str]) -> int | None:
    for c in candidates:
        idx = tok.token_to_id(c)
        if idx is not None:
            return idx
    return None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (``tokenizer.json``)."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
    ):
        self._tok = tok
        # tokenizer.json files exported by HF may carry padding/truncation settings; encode() must do neither.
        tok.no_truncation()
        tok.no_padding()
        self.bos_id = bos_id if bos_id is not None else _first_present(self, _BOS_CANDIDATES)
        self.eos_id = eos_id if eos_id is not None else _first_present(self, _EOS_CANDIDATES)
        self.pad_id = pad_id if pad_id is not None else _first_present(self, _PAD_CANDIDATES)
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: str) -> HFTokenizer:
        import tokenizers

        out = cls(tokenizers.Tokenizer.from_file(path))
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_CONFIG)
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                out._apply_config(json.load(f))
        return out

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(int(idx))

    @property
    def special_tokens(self) -> list[str]:
        added = self._tok.get_added_tokens_decoder()
        return [added[i].content for i in sorted(added) if added[i].special]

    def save(self, directory: str, chat_template: str | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, TOKENIZER_JSON))
        with open(os.path.join(directory, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(self._config_dict(chat_template), f, indent=2, ensure_ascii=False)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``.

    Round-trip identity (``decode(encode(s)) == s``) needs a model trained with
    ``normalization_rule_name="identity"``, ``add_dummy_prefix=False``, ``remove_extra_whitespaces=False`` and
    ``byte_fallback=True``; otherwise sentencepiece normalises whitespace / unicode by design.
    """

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self._path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self._path)
        self.chat_template = None
        self.bos_id = self._opt(self._sp.bos_id())
        self.eos_id = self._opt(self._sp.eos_id())
        self.pad_id = self._opt(self._sp.pad_id())
        if self.eos_id is None:
            self.eos_id = _first_present(self, _EOS_CANDIDATES)
        if self.pad_id is None:
            self.pad_id = _first_present(self, _PAD_CANDIDATES)
        cfg_path = os.path.join(os.path.dirname(self._path), TOKENIZER_CONFIG)
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                self._apply_config(json.load(f))

    @staticmethod
    def _opt(i: int) -> int | None:
        return None if i < 0 else int(i)

    @property
    def backend(self) -> sentencepiece.SentencePieceProcessor:
        return self._sp

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            drop = set(self._user_defined_ids())
            ids = [i for i in ids if not (self._sp.is_control(i) or i in drop)]
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        idx = int(self._sp.piece_to_id(token))
        # piece_to_id returns unk for unknown pieces; only accept it if token really is the unk piece.
        if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx):
            return None
        return idx

    def id_to_token(self, idx: int) -> str | None:
        idx = int(idx)
        if not 0 <= idx < self.vocab_size:
            return None
        return self._sp.id_to_piece(idx)

    def _user_defined_ids(self) -> list[int]:
        """Ids of user_defined_symbols (atomic in text); the python API has no is_user_defined, so read the proto."""
        if not hasattr(self, "_user_defined"):
            try:
                from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf

                proto = pb.ModelProto()
                proto.ParseFromString(self._sp.serialized_model_proto())
                kind = pb.ModelProto.SentencePiece.USER_DEFINED
                self._user_defined = [i for i, p in enumerate(proto.pieces) if p.type == kind]
            except ImportError:  # fallback: user-defined pieces are the normal-looking ones with score exactly 0
                sp = self._sp
                self._user_defined = [
                    i
                    for i in range(self.vocab_size)
                    if sp.get_score(i) == 0.0
                    and not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
                ]
        return self._user_defined

    def text_special_ids(self) -> list[int]:
        return list(self._user_defined_ids())

    @property
    def special_tokens(self) -> list[str]:
        """Control pieces (bos/eos/pad), unk and user_defined_symbols."""
        ids = set(self._user_defined_ids())
        ids |= {i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        return [self._sp.id_to_piece(i) for i in sorted(ids)]

    def save(self, directory: str, chat_template: str | None = None) -> None:
        """Writes ``tokenizer.model`` (a copy of the sentencepiece model) and ``tokenizer_config.json``."""
        os.makedirs(directory, exist_ok=True)
        dst = os.path.join(directory, SP_MODEL)
        if os.path.abspath(dst) != self._path:
            shutil.copyfile(self._path, dst)
        cfg = self._config_dict(chat_template)
        cfg["tokenizer_class"] = "PreTrainedTokenizer"
        with open(os.path.join(directory, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a directory (with tokenizer.json, else tokenizer.model), a tokenizer.json, or a .model.

    Raises:
      FileNotFoundError: the path (or the expected file in the directory) does not exist.
      ValueError: the file type is not recognised.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (TOKENIZER_JSON, SP_MODEL):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return load_tokenizer(candidate)
        raise FileNotFoundError(f"no {TOKENIZER_JSON} or {SP_MODEL} in tokenizer directory {path!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    if path.endswith(".json"):
        if os.path.basename(path) == TOKENIZER_CONFIG:
            raise ValueError(f"{path!r} is a tokenizer_config.json; pass the directory or its tokenizer.json")
        try:
            return HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"cannot parse Hugging Face tokenizer file {path!r}: {e}") from e
    if path.endswith(".model"):
        try:
            return SentencePieceTokenizer(path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot load sentencepiece model {path!r}: {e}") from e
    raise ValueError(f"unrecognised tokenizer file {path!r}: expected a directory, a tokenizer.json or a .model")
