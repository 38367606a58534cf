"""Engine correctness against the uncached full forward, batching invariance, n samples, stop tokens, continuous vs
static batching, parameter sharing and compilation counts.  One tiny model and one engine for the module, so the
jitted functions compile once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.sampling import SamplingEngine, SamplingError, SamplingParams, sampling_logprobs
from tests.sampling.models import full_logits, random_model

CFG = get_preset("tiny")
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [40, 41, 42, 43, 44]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=1)


@pytest.fixture(scope="module")
def engine(model):
    return SamplingEngine.from_model(model, num_slots=4, chunk=4, cache_len=64)


def greedy_reference(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(full_logits(model, ids)[-1])))
    return ids[len(prompt) :]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_equals_repeated_argmax_of_full_forward(model, engine):
    out = engine.generate(PROMPTS, GREEDY)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, 0) for i in range(len(PROMPTS))]
    for c, p in zip(out, PROMPTS):
        assert c.token_ids.tolist() == greedy_reference(model, p, 8)
        assert c.finish_reason == "length" and len(c.token_ids) == 8
        assert np.all(c.logprobs == 0.0)


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=8, ignore_eos=True),
    ],
    ids=["t1", "t07_k20_p09"],
)
def test_logprobs_equal_full_forward_recomputation(model, engine, sp):
    out = engine.generate(PROMPTS[:3], sp, key=7)
    for c in out:
        ids = c.prompt_ids + c.token_ids.tolist()
        lg = full_logits(model, ids)[len(c.prompt_ids) - 1 : -1]  # logits that produced each generated token
        g = np.arange(len(c.token_ids))
        raw = log_softmax(lg.astype(np.float64))[g, c.token_ids]
        np.testing.assert_allclose(c.raw_logprobs, raw, atol=1e-4)
        n = len(g)
        samp = np.asarray(
            sampling_logprobs(
                jnp.asarray(lg),
                jnp.full((n,), sp.temperature),
                jnp.full((n,), sp.top_k),
                jnp.full((n,), sp.top_p),
                filtered=sp.filtered,
            )
        )[g, c.token_ids]
        np.testing.assert_allclose(c.logprobs, samp, atol=1e-4)
        if not sp.filtered and sp.temperature == 1.0:
            np.testing.assert_allclose(c.logprobs, raw, atol=1e-4)
        assert np.all(np.isfinite(c.logprobs))


def test_output_independent_of_batch_companions(engine):
    alone = engine.generate([PROMPTS[1]], GREEDY)[0]
    for others in ([PROMPTS[2], PROMPTS[1], PROMPTS[0]], [[7] * 14, PROMPTS[0], PROMPTS[1], [2, 3]]):
        got = [c for c in engine.generate(others, GREEDY) if c.prompt_ids == PROMPTS[1]][0]
        assert got.token_ids.tolist() == alone.token_ids.tolist()
        np.testing.assert_allclose(got.raw_logprobs, alone.raw_logprobs, atol=1e-5)


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, GREEDY)
    topk1 = engine.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=8, ignore_eos=True), key=3)
    for a, b in zip(greedy, topk1):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(b.logprobs, 0.0, atol=1e-6)


def test_n_samples_share_one_prefill_and_differ(engine):
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, n=6, ignore_eos=True)
    out = engine.generate([PROMPTS[3]], sp, key=11)  # 6 samples over 4 slots: copies placed across two refills
    st = engine.last_stats
    assert st["prefill_calls"] == 1 and st["prefill_tokens"] == len(PROMPTS[3])
    assert [c.sample_index for c in out] == list(range(6))
    assert len({tuple(c.token_ids.tolist()) for c in out}) > 1
    again = engine.generate([PROMPTS[3]], sp, key=11, mode="static")  # explicit keys: reproducible
    assert [c.token_ids.tolist() for c in again] == [c.token_ids.tolist() for c in out]
    other = engine.generate([PROMPTS[3]], sp, key=12)
    assert [c.token_ids.tolist() for c in other] != [c.token_ids.tolist() for c in out]
    greedy = engine.generate([PROMPTS[3]], GREEDY.__class__(temperature=0.0, max_new_tokens=8, n=3, ignore_eos=True))
    assert len({tuple(c.token_ids.tolist()) for c in greedy}) == 1


def test_stop_tokens(model, engine):
    ref = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids.tolist()
    stop = ref[3]
    first = ref.index(stop)
    out = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, stop_token_ids=(stop,))
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids.tolist() == ref[: first + 1]  # the stop token is included
    # the config's eos (tiny: id 1) stops unless ignore_eos: find prompts whose greedy continuation contains it
    eos = CFG.eos_ids[0]
    cands = [[(7 * i + 3 * j) % 120 + 2 for j in range(1 + i % 5)] for i in range(24)]
    free = engine.generate(cands, GREEDY)
    hits = [(p, c.token_ids.tolist()) for p, c in zip(cands, free) if eos in c.token_ids.tolist()]
    assert hits, "no greedy continuation reaches eos; change the candidate prompts"
    stopped = engine.generate([p for p, _ in hits], SamplingParams(temperature=0.0, max_new_tokens=8))
    for (_, ref_ids), c in zip(hits, stopped):
        assert c.finish_reason == "stop" and c.token_ids.tolist() == ref_ids[: ref_ids.index(eos) + 1]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 8 for c in free)


def test_continuous_batching_equals_static(engine):
    prompts = [[i + 2, i + 3, (5 * i) % 97 + 2][: 1 + i % 3] + [11] * (i % 5) for i in range(10)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=1 + (7 * i) % 12, ignore_eos=True) for i in range(10)]
    cont = engine.generate(prompts, params, mode="continuous")
    cst = engine.last_stats
    stat = engine.generate(prompts, params, mode="static")
    sst = engine.last_stats
    for a, b, sp in zip(cont, stat, params):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert len(a.token_ids) == sp.max_new_tokens and a.finish_reason == "length"
    assert cst["generated_tokens"] == sst["generated_tokens"] == sum(sp.max_new_tokens for sp in params)
    assert cst["row_steps"] < sst["row_steps"]  # freed slots were refilled instead of idling


def test_params_are_shared_not_copied(model, engine):
    g, s = nnx.split(model)
    eng = SamplingEngine.from_model(model, num_slots=4, chunk=4, cache_len=64)
    assert all(a is b for a, b in zip(jax.tree.leaves(eng.state), jax.tree.leaves(s)))
    before = eng.generate([PROMPTS[0]], GREEDY)[0].token_ids.tolist()
    other = random_model(CFG, seed=5)
    eng.update_params(nnx.state(other))
    after = eng.generate([PROMPTS[0]], GREEDY)[0].token_ids.tolist()
    assert after == greedy_reference(other, PROMPTS[0], 8) and after != before


def test_no_recompilation_per_step_or_prompt_length(engine):
    events = []

    def listener(name, *a, **k):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    engine.generate([[4, 5, 6], [8] * 7], GREEDY)  # warm these buckets (2 prompts -> batch bucket 2)
    counts = engine.compile_counts()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # other prompt lengths in the same length bucket, more decode steps than before
        engine.generate([[9] * 12, [3]], SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True))
        engine.generate([[1, 2], [7] * 16], GREEDY)
        assert engine.compile_counts() == counts
        assert events == []
        # a longer prompt: one new prefill bucket (32) and its insert (which copies that bucket's positions only),
        # nothing else
        engine.generate([[5] * 20, [6]], GREEDY)
        new = engine.compile_counts()
        assert new["prefill"] == counts["prefill"] + 1 and new["insert"] == counts["insert"] + 1
        same = ("decode", "empty")
        assert {k: new[k] for k in same} == {k: counts[k] for k in same}
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_bad_requests(engine):
    with pytest.raises(SamplingError, match="empty"):
        engine.generate([[]], GREEDY)
    with pytest.raises(SamplingError, match="no room"):
        engine.generate([[3] * CFG.max_position_embeddings], GREEDY)
    with pytest.raises(SamplingError, match="no room"):
        engine.generate([[3] * 64], GREEDY)  # cache_len 64
    with pytest.raises(SamplingError, match="outside"):
        engine.generate([[CFG.vocab_size]], GREEDY)
    with pytest.raises(SamplingError):
        SamplingParams(top_p=0.0)


def test_decode_moe_path_selection(model, engine):
    """Unless moe_impl is given, decode on CPU runs the capacity path while E <= num_slots * k <= 32 E (a mean
    expert group of at most 32 rows); prefill keeps the configured path."""
    from ring_jax.sampling.device import CAPACITY_DECODE_MAX_GROUP, decode_moe_impl

    e, k = CFG.num_experts, CFG.num_experts_per_tok
    assert decode_moe_impl(CFG, e // k, "cpu") == "capacity"
    assert decode_moe_impl(CFG, e // k - 1, "cpu") == CFG.moe_impl  # fewer assignments than experts
    assert decode_moe_impl(CFG, CAPACITY_DECODE_MAX_GROUP * e // k, "cpu") == "capacity"
    assert decode_moe_impl(CFG, CAPACITY_DECODE_MAX_GROUP * e // k + 1, "cpu") == CFG.moe_impl
    assert decode_moe_impl(CFG, 4, "gpu") == CFG.moe_impl
    assert decode_moe_impl(CFG.replace(num_experts=None, moe_intermediate_size=None), 4, "cpu") == CFG.moe_impl
    if jax.default_backend() == "cpu":
        assert engine.decode_moe_impl == "capacity" and engine.cfg.moe_impl == "dispatch"
    explicit = SamplingEngine.from_model(model, num_slots=4, chunk=4, cache_len=64, moe_impl="dispatch")
    assert explicit.decode_moe_impl == "dispatch" and explicit.decode_graphdef is explicit.graphdef


def test_capacity_decode_equals_dispatch_decode(model, engine):
    """The decode fast path (capacity MoE) gives the tokens and logprobs of the configured dispatch path."""
    disp = SamplingEngine.from_model(model, num_slots=4, chunk=4, cache_len=64, moe_impl="dispatch")
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    for params in (GREEDY, sp):
        a, b = engine.generate(PROMPTS, params, key=5), disp.generate(PROMPTS, params, key=5)
        for x, y in zip(a, b):
            assert x.token_ids.tolist() == y.token_ids.tolist()
            np.testing.assert_allclose(x.raw_logprobs, y.raw_logprobs, atol=1e-5)
