import json
import logging

import numpy as np
import pytest

from ring_jax.data.chat import ChatRenderer
from ring_jax.data.jsonl import DataError, load_prompt_records, load_sft_examples, resolve_paths

GOOD_CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
GOOD_PR = {"prompt": "capital of France?", "response": "Paris", "system": "be brief"}
LONG = {"prompt": "x " * 200, "response": "y"}

# (line text, expected reason or None for good); line numbers are 1-based and count blank lines
LINES = [
    (json.dumps(GOOD_CHAT), None),  # 1
    (json.dumps(GOOD_PR), None),  # 2
    ('{"prompt": "unterminated', "bad_json"),  # 3
    ("", None),  # 4 blank: ignored, not counted
    (json.dumps({"prompt": "no response"}), "missing_fields"),  # 5
    (json.dumps([1, 2]), "not_object"),  # 6
    (
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
        "empty_assistant",
    ),  # 7
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no_assistant_turn"),  # 8
    (json.dumps({"messages": [{"role": "wizard", "content": "q"}]}), "bad_messages"),  # 9
    (json.dumps(LONG), "too_long"),  # 10
    (json.dumps(GOOD_CHAT), None),  # 11
]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_records_counted_with_line_numbers(bpe_tok, tmp_path, caplog):
    path = write(tmp_path / "sft.jsonl", [l for l, _ in LINES])
    with caplog.at_level(logging.WARNING, logger="ring_jax.data.jsonl"):
        examples, stats = load_sft_examples(str(path), bpe_tok, max_tokens=64, max_bad_fraction=0.8)
    expected_bad = [(str(path), i + 1, r) for i, (l, r) in enumerate(LINES) if r]
    assert stats.bad_records == expected_bad
    assert (stats.total, stats.good, stats.bad) == (10, 3, 7)
    assert stats.reasons["bad_json"] == 1 and sum(stats.reasons.values()) == 7
    assert f"{path}:3" in caplog.text and f"{path}:10" in caplog.text
    # good records tokenized exactly as the chat renderer does
    ids, mask = ChatRenderer(bpe_tok).render(GOOD_CHAT["messages"])
    assert np.array_equal(examples[0][0], ids) and np.array_equal(examples[0][1], mask)
    assert bpe_tok.decode(examples[1][0][examples[1][1] == 1]) == "Paris<|im_end|>"


def test_abort_above_bad_fraction(bpe_tok, tmp_path):
    path = write(tmp_path / "sft.jsonl", [l for l, _ in LINES])
    with pytest.raises(DataError, match=r"7/10 bad SFT records.*max_bad_fraction=0.5"):
        load_sft_examples(path, bpe_tok, max_tokens=64, max_bad_fraction=0.5)
    # 1 bad in 21 is under 5% (the default) -> fine; 2 bad in 21 is over
    ok = write(tmp_path / "ok.jsonl", [json.dumps(GOOD_CHAT)] * 20 + ["nope"])
    assert load_sft_examples(ok, bpe_tok)[1].bad == 1
    bad2 = write(tmp_path / "bad2.jsonl", [json.dumps(GOOD_CHAT)] * 19 + ["nope", "{}"])
    with pytest.raises(DataError, match="bad fraction"):
        load_sft_examples(bad2, bpe_tok)
    with pytest.raises(DataError, match="no usable"):
        load_sft_examples(write(tmp_path / "allbad.jsonl", ["{}"]), bpe_tok, max_bad_fraction=1.0)
    with pytest.raises(DataError, match="does not exist"):
        load_sft_examples(tmp_path / "missing.jsonl", bpe_tok)


def test_sources_dir_glob_list_records(bpe_tok, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write(d / "b.jsonl", [json.dumps(GOOD_PR)])
    write(d / "a.jsonl", [json.dumps(GOOD_CHAT)] * 2)
    (d / "notes.txt").write_text("ignored")
    assert resolve_paths(d) == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    assert resolve_paths(str(d / "*.jsonl")) == resolve_paths([d / "a.jsonl", str(d / "b.jsonl")])
    assert load_sft_examples(d, bpe_tok)[1].good == 3
    ex, stats = load_sft_examples([GOOD_CHAT, {"bad": 1}, GOOD_PR], bpe_tok, max_bad_fraction=0.5)
    assert stats.bad_records == [("<records>", 2, "missing_fields")] and len(ex) == 2
    with pytest.raises(DataError, match="no .jsonl"):
        resolve_paths(str(d / "*.parquet"))


def test_prompt_records(bpe_tok, tmp_path):
    lines = [
        json.dumps({"task": "math", "prompt": "1+1?", "answer": "2"}),  # 1
        json.dumps({"task": "code", "prompt_ids": [5, 6, 7], "tests": ["assert f()"]}),  # 2
        json.dumps(
            {"task": "logic", "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
        ),  # 3
        json.dumps({"prompt": "no task"}),  # 4
        json.dumps({"task": "math"}),  # 5
        json.dumps({"task": "math", "prompt": "   "}),  # 6
        json.dumps({"task": "math", "prompt_ids": [1, "x"]}),  # 7
        json.dumps({"task": "math", "prompt": "word " * 100}),  # 8 too long
        "[",  # 9
    ]
    path = write(tmp_path / "rl.jsonl", lines)
    recs, stats = load_prompt_records(path, max_bad_fraction=0.9)
    assert [r["task"] for r in recs] == ["math", "code", "logic", "math"]  # no tokenizer: no length check
    assert "prompt_ids" not in recs[0] and recs[0]["answer"] == "2" and recs[1]["tests"] == ["assert f()"]
    assert [(l, r) for _, l, r in stats.bad_records] == [
        (4, "missing_task"),
        (5, "missing_prompt"),
        (6, "bad_prompt"),
        (7, "bad_prompt"),
        (9, "bad_json"),
    ]
    recs, stats = load_prompt_records(path, tokenizer=bpe_tok, max_prompt_tokens=40, max_bad_fraction=0.9)
    assert [r["task"] for r in recs] == ["math", "code", "logic"] and stats.reasons["too_long"] == 1
    r = ChatRenderer(bpe_tok)
    assert recs[0]["prompt_ids"] == r.render_prompt([{"role": "user", "content": "1+1?"}]).tolist()
    assert recs[1]["prompt_ids"] == [5, 6, 7]
    assert bpe_tok.decode(recs[2]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError):
        load_prompt_records(path)


def test_invalid_utf8_line_is_skipped_not_fatal(bpe_tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(GOOD_CHAT, ensure_ascii=False).encode()
    path.write_bytes(b"\n".join([good, b'{"prompt": "\xff\xfe", "response": "x"}', good, good]) + b"\n")
    ex, stats = load_sft_examples(path, bpe_tok, max_bad_fraction=0.5)
    assert len(ex) == 3 and stats.bad_records == [(str(path), 2, "bad_utf8")]
