"""A learned reward model: the BailingMoe backbone with a scalar value head (``ring_jax.model.reward_head``),
scored on the mesh; Bradley-Terry training is ``ring_jax.rl.reward_trainer``.

Input: a (prompt, response) pair is rendered with the chat template the policy was trained on (ChatML by default)
as ``render_prompt([user: prompt]) + encode(response) + stop_ids``, i.e. the user turn, the assistant header, the
response and the assistant end-of-turn marker, which is the token the score is read at.  The policy's responses come
back without their stop tokens (``ring_jax.rl.step``), so every response, finished or cut at the length limit, is
closed the same way; an empty response is allowed.  Sequences longer than ``max_len`` keep their LAST ``max_len``
tokens (the response end matters most to the score).

Batches are right-padded (segment id 0, which the attention mask and the MoE statistics ignore) to a power-of-two
length bucket (at least ``min_len``) and a power-of-two row count that the data-parallel mesh axes divide, so a
handful of shapes are compiled, and a score does not depend on its batch partners or on the padding.  The scoring
function is ``jax.jit`` with explicit shardings: parameters by the logical-axis rules table
(``ring_jax.sharding``), token rows over the data-like axes, the scores replicated.  Every process passes the same
prompts and responses (as ring-jax-rl's processes do) and builds the global batch from them, so scoring also runs
on a multi-process mesh.

`LearnedRewardModel` implements ``ring_jax.rewards.general.RewardModel`` (``score_batch(prompts, responses)``), so

    register_reward_model(LearnedRewardModel.from_policy_checkpoint("runs/sft", mesh=mesh))

makes the ``reward_model`` reward task score with it.  `save` / `load` write and read an orbax checkpoint
(parameters and the model config; the tokenizer alongside in ``tokenizer/``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ring_jax.config import ModelConfig
from ring_jax.data.chat import CHATML, ChatRenderer, ChatTemplate
from ring_jax.model.reward_head import POLICY_ONLY, ValueHead, build_reward_net
from ring_jax.model.transformer import abstract_model
from ring_jax.sharding import DEFAULT_RULES, ShardingRules, batch_sharding, make_mesh, state_shardings
from ring_jax.train.step import data_parallel_size, split_model

if TYPE_CHECKING:
    from ring_jax.data.tokenizer import Tokenizer


class RewardModelError(ValueError):
    """Bad input to the reward model (empty batch, mismatched lengths, unusable checkpoint or tokenizer)."""


# --------------------------------------------------------------------------------------------------------- batching
def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pad_rows(seqs: Sequence[Sequence[int]], row_multiple: int = 1, min_len: int = 16) -> dict[str, np.ndarray]:
    """Right-pad token lists into ``tokens`` / ``segment_ids`` [R, T] and ``last_idx`` [R] (numpy int32).

    T = the next power of two >= max(longest sequence, min_len); R = the next power of two >= len(seqs), rounded
    up to a multiple of ``row_multiple``.  Padding rows are all padding (segment 0, last_idx 0); their scores are
    meaningless and dropped by the caller."""
    if not seqs:
        raise RewardModelError("no sequences to pad")
    if any(len(s) == 0 for s in seqs):
        raise RewardModelError("empty token sequence")
    t = _pow2(max(max(len(s) for s in seqs), min_len))
    r = _pow2(len(seqs))
    r = -(-r // row_multiple) * row_multiple
    tokens = np.zeros((r, t), np.int32)
    seg = np.zeros((r, t), np.int32)
    last = np.zeros((r,), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        seg[i, : len(s)] = 1
        last[i] = len(s) - 1
    return {"tokens": tokens, "segment_ids": seg, "last_idx": last}


def row_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """[R] arrays (scores, last_idx): rows over the data-like mesh axes, like the token rows."""
    return NamedSharding(mesh, P(*tuple(batch_sharding(mesh, 1, rules).spec)[:1]))


# --------------------------------------------------------------------------------------------------------- model
class LearnedRewardModel:
    """A `RewardNet` with its parameters on a mesh, a tokenizer and a chat template: ``score_batch(prompts,
    responses) -> list[float]`` (the ``ring_jax.rewards.general.RewardModel`` protocol).

    Args:
      cfg: the backbone's ModelConfig (the policy's).
      tokenizer: a ``ring_jax.data`` tokenizer whose ids fit ``cfg.vocab_size``.
      mesh: where parameters and batches live (default: every device on ``data``).
      params: a pure parameter tree of a `RewardNet` (default: freshly initialised from ``seed``).
      template: the chat template the policy was trained with.
      max_len: longest scored sequence (default ``cfg.max_position_embeddings``); longer ones keep their tail.
      max_batch: sequences per compiled call (larger inputs are scored in chunks).
      min_len: the smallest length bucket.
      rules: the logical-axis -> mesh-axis table (``ring_jax.sharding.DEFAULT_RULES``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: Tokenizer,
        *,
        mesh: Mesh | None = None,
        params: dict[str, Any] | None = None,
        seed: int = 0,
        template: ChatTemplate = CHATML,
        max_len: int | None = None,
        max_batch: int = 64,
        min_len: int = 16,
        rules: ShardingRules = DEFAULT_RULES,
    ):
        if tokenizer.vocab_size > cfg.vocab_size:
            raise RewardModelError(f"tokenizer vocabulary {tokenizer.vocab_size} > model vocab_size {cfg.vocab_size}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer, template)
        self.mesh = mesh if mesh is not None else make_mesh("")
        self.rules = rules
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.max_batch = int(max_batch)
        self.min_len = int(min_len)
        self.seed = seed
        abstract = nnx.eval_shape(lambda: build_reward_net(cfg, seed))
        self.graphdef, self.param_vars, _ = split_model(abstract)
        self.param_shardings = nnx.to_pure_dict(state_shardings(self.param_vars, self.mesh, rules))
        if params is None:  # compiled with sharded outputs: no device ever holds the whole model
            init = jax.jit(
                lambda: nnx.to_pure_dict(nnx.state(build_reward_net(cfg, seed))), out_shardings=self.param_shardings
            )
            params = init()
        else:
            params = jax.device_put(params, self.param_shardings)
        self.params = params
        self.row_multiple = data_parallel_size(self.mesh, rules)
        tok_sh = batch_sharding(self.mesh, 2, rules)
        row_sh = row_sharding(self.mesh, rules)
        graphdef = self.graphdef

        def scores(params, tokens, segment_ids, last_idx):
            return nnx.merge(graphdef, params)(tokens, segment_ids, last_idx).scores

        self._in_shardings = (tok_sh, tok_sh, row_sh)
        # scores come back replicated (a few floats), so every process can read them
        self._score = jax.jit(
            scores,
            in_shardings=(self.param_shardings, tok_sh, tok_sh, row_sh),
            out_shardings=NamedSharding(self.mesh, P()),
        )

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_policy_checkpoint(
        cls,
        path: str,
        tokenizer: Tokenizer | None = None,
        *,
        step: int | None = None,
        mesh: Mesh | None = None,
        seed: int = 0,
        **kw: Any,
    ) -> LearnedRewardModel:
        """Backbone from a policy's orbax checkpoint (a run directory holding ``ckpt/`` or the ``ckpt`` directory
        itself; the newest step unless ``step``), value head freshly initialised.  The tokenizer defaults to the
        run's ``tokenizer/``."""
        from ring_jax.train.checkpoint import Checkpointer, CheckpointError, model_config_from_meta, resolve_ckpt_dir

        run_dir, ckpt_dir = resolve_ckpt_dir(path)
        mesh = mesh if mesh is not None else make_mesh("")
        try:
            with Checkpointer(ckpt_dir, read_only=True) as c:
                cfg = model_config_from_meta(c.read_meta(step))
                _, pvars, abstract = split_model(abstract_model(cfg))
                shardings = nnx.to_pure_dict(state_shardings(pvars, mesh, kw.get("rules", DEFAULT_RULES)))
                policy = c.restore_params(abstract, shardings, step).params
        except CheckpointError as e:
            raise RewardModelError(f"policy checkpoint {path}: {e}") from e
        if tokenizer is None:
            tokenizer = _run_tokenizer(run_dir, path)
        head = nnx.to_pure_dict(nnx.state(ValueHead(cfg, nnx.Rngs(params=seed))))
        params = {"backbone": {k: v for k, v in policy.items() if k not in POLICY_ONLY}, "value_head": head}
        return cls(cfg, tokenizer, mesh=mesh, seed=seed, params=params, **kw)

    def save(self, directory: str, step: int = 0) -> None:
        """Parameters + model config as an orbax checkpoint in ``directory/ckpt``; the tokenizer in
        ``directory/tokenizer``."""
        from ring_jax.train.checkpoint import Checkpointer

        with Checkpointer(os.path.join(directory, "ckpt"), keep=None) as c:
            c.save(
                step,
                params=self.params,
                meta={
                    "model_config": self.cfg.to_hf_dict(),
                    "runtime": {
                        "dtype": self.cfg.dtype,
                        "param_dtype": self.cfg.param_dtype,
                        "moe_impl": self.cfg.moe_impl,
                    },
                    "reward_model": {"template": self.renderer.template.name, "max_len": self.max_len},
                },
                wait=True,
            )
        self.tokenizer.save(os.path.join(directory, "tokenizer"))

    @classmethod
    def load(
        cls, directory: str, *, step: int | None = None, mesh: Mesh | None = None, **kw: Any
    ) -> LearnedRewardModel:
        """A reward model written by `save` (its tokenizer, template and max_len unless overridden)."""
        from ring_jax.data.chat import TEMPLATES
        from ring_jax.train.checkpoint import Checkpointer, CheckpointError, model_config_from_meta

        try:
            with Checkpointer(os.path.join(directory, "ckpt"), read_only=True) as c:
                meta = c.read_meta(step)
                if "reward_model" not in meta:
                    raise RewardModelError(
                        f"{directory}: not a reward-model checkpoint (a policy? use from_policy_checkpoint)"
                    )
                cfg = model_config_from_meta(meta)
                mesh = mesh if mesh is not None else make_mesh("")
                _, pvars, abstract = split_model(nnx.eval_shape(lambda: build_reward_net(cfg)))
                rules = kw.get("rules", DEFAULT_RULES)
                params = c.restore_params(abstract, nnx.to_pure_dict(state_shardings(pvars, mesh, rules)), step).params
                rm = cls(
                    cfg,
                    kw.pop("tokenizer", None) or _run_tokenizer(directory, directory),
                    mesh=mesh,
                    params=params,
                    template=kw.pop("template", TEMPLATES.get(meta["reward_model"].get("template"), CHATML)),
                    max_len=kw.pop("max_len", meta["reward_model"].get("max_len")),
                    **kw,
                )
        except CheckpointError as e:
            raise RewardModelError(f"reward model {directory}: {e}") from e
        return rm

    # ------------------------------------------------------------------------------------------ scoring
    def encode(self, prompt: str, response: str) -> list[int]:
        """Token ids of one (prompt, response) pair (see the module docstring), at most ``max_len`` long."""
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise RewardModelError(
                f"prompt and response must be strings, got {type(prompt).__name__} and {type(response).__name__}"
            )
        ids = [int(i) for i in self.renderer.render_prompt([{"role": "user", "content": prompt}])]
        ids += list(self.tokenizer.encode(response)) if response else []
        ids += list(self.renderer.stop_ids)
        return ids[-self.max_len :]

    def score_ids(self, seqs: Sequence[Sequence[int]], params: dict[str, Any] | None = None) -> np.ndarray:
        """float32 scores of token sequences (``max_batch`` per compiled call)."""
        params = self.params if params is None else params
        out = []
        for i in range(0, len(seqs), self.max_batch):
            chunk = seqs[i : i + self.max_batch]
            b = pad_rows(chunk, self.row_multiple, self.min_len)
            # every process holds the whole (identical) host batch; each device takes its rows from it
            args = [
                jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx])
                for x, sh in zip((b["tokens"], b["segment_ids"], b["last_idx"]), self._in_shardings)
            ]
            s = self._score(params, *args)
            out.append(np.asarray(jax.device_get(s))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Scores of ``responses[i]`` to ``prompts[i]`` (the RewardModel protocol)."""
        if len(prompts) != len(responses):
            raise RewardModelError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        return [float(s) for s in self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])]


def _run_tokenizer(run_dir: str, what: str):
    from ring_jax.data import load_tokenizer

    tok_dir = os.path.join(run_dir, "tokenizer")
    if not os.path.isdir(tok_dir):
        raise RewardModelError(f"{what}: no tokenizer/ next to the checkpoint; pass tokenizer=")
    return load_tokenizer(tok_dir)


__all__ = ["LearnedRewardModel", "RewardModelError", "pad_rows", "row_sharding"]
