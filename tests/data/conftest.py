"""Shared fixture for the data tests: a BPE trained on a tiny generated corpus (once per session)."""

import pytest

from tests.data.synth import make_texts


@pytest.fixture(scope="session")
def bpe_tok():
    from ring_jax.data.bpe import train_bpe

    return train_bpe(make_texts(400, seed=123), vocab_size=420)
