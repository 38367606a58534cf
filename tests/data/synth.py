"""Generated text / SFT records for the data tests."""

import random

WORDS = (
    "the a of to and is in it that for on with as at by this we be are from or an was not but "
    "answer question step think therefore so let compute sum product number value equal solve "
    "café naïve über straße 数学 答案 思考 ответ число"
).split()


def make_texts(n, seed=0, min_words=3, max_words=25):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        parts = []
        for _ in range(k):
            w = rng.choice(WORDS)
            if rng.random() < 0.15:
                w = str(rng.randint(0, 999))
            parts.append(w)
        s = " ".join(parts)
        if rng.random() < 0.3:
            s += rng.choice([".", "?", "!", "\n", ":\n- x"])
        out.append(s)
    return out


def make_sft_records(n, seed=0, max_words=25):
    rng = random.Random(seed)
    texts = make_texts(2 * n, seed=seed + 1, max_words=max_words)
    recs = []
    for i in range(n):
        if rng.random() < 0.5:
            recs.append({"prompt": texts[2 * i], "response": texts[2 * i + 1]})
        else:
            msgs = [{"role": "system", "content": "be brief"}] if rng.random() < 0.5 else []
            msgs += [{"role": "user", "content": texts[2 * i]}, {"role": "assistant", "content": texts[2 * i + 1]}]
            recs.append({"messages": msgs})
    return recs
