import json
import os

import pytest

from ring_jax.data import bpe
from ring_jax.data.chat import CHATML, ChatRenderer
from ring_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.data.synth import make_texts

HELD_OUT = [
    "",
    "the answer is 42.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\nlines\r\n",
    "unseen unicode: ñ ü ß 漢字 かな 한국어 emoji 🙂🚀 and math ∑∫√π",
    "mixed <|im_start|>user\nhi<|im_end|> markers",
    "code: def f(x):\n    return x ** 2  # comment",
]


def test_bpe_special_ids_and_roundtrip(bpe_tok):
    assert [bpe_tok.token_to_id(t) for t in bpe.DEFAULT_SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert bpe_tok.pad_id == 0 and bpe_tok.eos_id == 1 and bpe_tok.bos_id is None
    assert bpe_tok.special_tokens == list(bpe.DEFAULT_SPECIAL_TOKENS)
    assert 260 < bpe_tok.vocab_size <= 420
    for s in HELD_OUT + make_texts(20, seed=999):
        ids = bpe_tok.encode(s)
        assert all(0 <= i < bpe_tok.vocab_size for i in ids)
        assert bpe_tok.decode(ids) == s
    # special token strings are single ids; skip_special_tokens drops them
    ids = bpe_tok.encode("a<|im_end|>b")
    assert bpe_tok.token_to_id("<|im_end|>") in ids
    assert bpe_tok.decode(ids, skip_special_tokens=True) == "ab"
    assert bpe_tok.encode_batch(HELD_OUT) == [bpe_tok.encode(s) for s in HELD_OUT]
    assert bpe_tok.token_to_id("<|no such token|>") is None


def test_bpe_deterministic_and_validates():
    texts = make_texts(150, seed=5)
    a = bpe.train_bpe(texts, 300)
    b = bpe.train_bpe(iter(texts), 300)
    assert a.backend.to_str() == b.backend.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train_bpe(texts, 100)


def test_bpe_splits_digits():
    """With split_digits (the default) no token holds two digits, however often a number occurs, and text still
    round-trips; without it the trainer merges frequent numbers into single tokens."""
    texts = [f"{a} + {b} = {a + b}" for a in range(10, 40) for b in range(10, 40)] * 3
    tok = bpe.train_bpe(texts, 400)
    pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]
    for s in ["12 + 345 = 357", "x=1234567890", texts[7]]:
        assert tok.decode(tok.encode(s)) == s
    assert [tok.decode([i]) for i in tok.encode("17 + 25")] == ["1", "7", " +", " ", "2", "5"]
    merged = bpe.train_bpe(texts, 400, split_digits=False)
    assert any(sum(c.isdigit() for c in merged.decode([i])) > 1 for i in range(merged.vocab_size))


def test_save_load_identity(bpe_tok, tmp_path):
    bpe_tok.save(str(tmp_path / "tok"))
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["pad_token"] == "<|pad|>" and cfg["bos_token"] is None
    assert cfg["chat_template"] == CHATML.jinja()
    assert set(cfg["additional_special_tokens"]) == {"<|im_start|>", "<|im_end|>"}
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        t2 = load_tokenizer(path)
        assert isinstance(t2, HFTokenizer)
        assert (t2.vocab_size, t2.bos_id, t2.eos_id, t2.pad_id) == (bpe_tok.vocab_size, None, 1, 0)
        assert t2.chat_template == CHATML.jinja()
        for s in HELD_OUT:
            assert t2.encode(s) == bpe_tok.encode(s)
            assert t2.decode(t2.encode(s)) == s


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "bad")
    (tmp_path / "x.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="x.model"):
        load_tokenizer(tmp_path / "x.model")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in make_texts(300, seed=7)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "sp"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_by_whitespace=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return str(d / "sp.model")


def test_sentencepiece_roundtrip_and_save(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.vocab_size == 400
    assert tok.token_to_id("<|im_end|>") is not None and tok.token_to_id("<|nope|>") is None
    for s in HELD_OUT + make_texts(20, seed=999):
        assert tok.decode(tok.encode(s)) == s, s
    tok.save(str(tmp_path / "sp_export"), chat_template=CHATML.jinja())
    assert os.path.isfile(tmp_path / "sp_export" / "tokenizer.model")
    t2 = load_tokenizer(tmp_path / "sp_export")
    assert isinstance(t2, SentencePieceTokenizer) and t2.chat_template == CHATML.jinja()
    assert (t2.pad_id, t2.bos_id, t2.eos_id) == (0, 2, 3)
    assert all(t2.encode(s) == tok.encode(s) for s in HELD_OUT)
    # the chat template works with the sentencepiece backend too
    msgs = [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4 🙂"}]
    ids, mask = ChatRenderer(tok).render(msgs)
    assert tok.decode(ids) == CHATML.render_text(msgs)
    assert tok.decode(ids[mask == 1]) == "4 🙂<|im_end|>"


def test_loaded_tokenizer_ignores_padding_and_truncation_settings(bpe_tok, tmp_path):
    import tokenizers

    raw = tokenizers.Tokenizer.from_str(bpe_tok.backend.to_str())
    raw.enable_truncation(3)
    raw.enable_padding(length=50)
    (tmp_path / "t").mkdir()
    raw.save(str(tmp_path / "t" / "tokenizer.json"))
    t = load_tokenizer(tmp_path / "t")
    s = HELD_OUT[4]
    assert t.encode(s) == bpe_tok.encode(s) and len(t.encode(s)) > 3
    assert t.eos_id == 1 and t.pad_id == 0  # from the token names when there is no tokenizer_config.json
