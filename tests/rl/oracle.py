"""NumPy oracle of the C3PO objective (Ring-lite Eqs. 3 and 6 with the truncated importance weight): the loss and
its gradient with respect to the logits, derived by hand (not by autodiff), in float64.

Per trained token t (weight w_t), with p = softmax(z_t), logp = log p[y_t], r = exp(logp - old_t):

    l_t = -( m_t * tis_t * min(r A, clip(r, 1 - eps, 1 + eps) A) - beta * k3(ref_t - logp) ) - alpha_ent * H(p)
    dl_t/dz = [ -m_t * tis_t * A * r * [clip inactive] + beta * (1 - exp(ref_t - logp)) ] * (onehot(y_t) - p)
              + alpha_ent * p * (log p + H)

m_t is the IcePop mask (batch["pg_mask"], 1 when absent): a masked token keeps only its KL and entropy terms.

The clip is inactive unless (A > 0 and r > 1 + eps) or (A < 0 and r < 1 - eps): there the clipped term is the
minimum and is constant in theta.  Loss = sum_t w_t l_t / Phi."""

import numpy as np


def policy_loss_and_dlogits(logits, batch, phi, clip_eps, beta, alpha_ent):
    z = np.asarray(logits, np.float64)
    y = np.asarray(batch["targets"])
    w = np.asarray(batch["weights"], np.float64)
    old = np.asarray(batch["old_logp"], np.float64)
    adv = np.asarray(batch["advantages"], np.float64)
    tis = np.asarray(batch.get("tis", np.ones_like(w)), np.float64)
    tis = tis * np.asarray(batch.get("pg_mask", np.ones_like(w)), np.float64)  # the mask scales the same term
    ref = np.asarray(batch["ref_logp"], np.float64) if beta else None
    zmax = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(-1, keepdims=True)) + zmax
    logp_all = z - lse
    p = np.exp(logp_all)
    ent = -(p * logp_all).sum(-1)
    logp = np.take_along_axis(logp_all, y[..., None], -1)[..., 0]
    r = np.exp(logp - old)
    clipped = np.clip(r, 1 - clip_eps, 1 + clip_eps)
    pg = np.minimum(r * adv, clipped * adv)
    active = ~(((adv > 0) & (r > 1 + clip_eps)) | ((adv < 0) & (r < 1 - clip_eps)))
    dl_dlogp = -tis * adv * r * active
    kl = np.zeros_like(logp)
    if beta:
        d = ref - logp
        kl = np.exp(d) - d - 1
        dl_dlogp = dl_dlogp + beta * (1 - np.exp(d))
    loss = np.sum(w * (-(tis * pg - beta * kl) - alpha_ent * ent)) / phi
    onehot = np.zeros_like(z)
    np.put_along_axis(onehot, y[..., None], 1.0, -1)
    dz = dl_dlogp[..., None] * (onehot - p) + alpha_ent * p * (logp_all + ent[..., None])
    return loss, w[..., None] * dz / phi
