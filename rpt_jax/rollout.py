"""The rollout: a step's samples scored, turned into group advantages and the update's rows.

`make_rollout` is the jitted middle of a training step (sampler -> rollout -> update). It also
hands back the first contexts' samples and rewards, replicated, which `records` turns into the
readable rollouts the trainer logs (<workdir>/samples.jsonl, logging.samples_every).

Shapes: B contexts, G samples each (row b*G+g), R response tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rpt_jax import model as model_lib
from rpt_jax import objective, sharding
from rpt_jax import reward as reward_lib

# the global batch's fields the rollout reads
ROLLOUT_KEYS = ("prompt_tokens", "prompt_mask", "context_tokens", "context_mask",
                "target_bytes", "target_len", "boundaries", "target_tokens")
SHOWN_CONTEXT_CHARS = 500  # of a logged context, its last characters


def _true_token_prob(params, batch, cfg):
    """p(x_t | x_<t) under the model, from the raw context (the dense rewards' fallback). [B]."""
    mask = batch["context_mask"].astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    h, _ = model_lib.hidden_states(params, batch["context_tokens"], cfg, positions, mask)
    logits = model_lib.logits_from_hidden(params, h[:, -1:], cfg)[:, 0]
    probs = jax.nn.softmax(logits, axis=-1)
    true = jnp.maximum(batch["target_tokens"][:, 0], 0)
    return jnp.take_along_axis(probs, true[:, None], axis=1)[:, 0]


def make_rollout(config, model_cfg, mesh):
    """Jitted fn(params, samples, batch, table, use_keep, reference=None) -> (train batch,
    metrics, shown).

    samples: sampling.SampleOutput of B*G rows; batch: the ROLLOUT_KEYS of a global batch;
    table: the padded reward.ByteTable; use_keep: bool scalar, DAPO dynamic sampling on (a traced
    value, so switching it on at rl.dynamic_sampling_start compiles nothing new); reference:
    the KL reference's params (`reference_params`), whose log-probs of the samples become the
    train batch's ref_logprobs (each prompt once per context with rl.share_prompt). Scores with
    the reward, forms group advantages and lays out objective.make_train_batch's rows. shown:
    the first logging.samples_contexts contexts and their samples, replicated (for `records`).
    """
    G, kind = int(config.sampling.num_samples), config.reward.kind
    think_end = str(config.reward.think_end).encode()
    shared = G if config.rl.get("share_prompt", False) and G > 1 else 1
    n_shown = int(config.logging.samples_contexts)

    def fn(params, samples, batch, table, use_keep, reference=None):
        rep = lambda x: jnp.repeat(x, G, axis=0)  # noqa: E731 (row b*G+g <- context b)
        target_prob = None
        if kind in ("dense", "conditional_dense"):
            target_prob = rep(_true_token_prob(params, batch, model_cfg))
        reward, diag = reward_lib.score(
            samples.tokens, samples.lengths, table, rep(batch["target_bytes"]),
            rep(batch["target_len"]), rep(batch["boundaries"]), kind=kind, think_end=think_end,
            max_pred_bytes=int(config.reward.max_pred_bytes), target_prob=target_prob,
            group_size=G if kind == "conditional_dense" else None)
        adv = objective.group_advantages(reward, G, config.rl.advantage, float(config.rl.adv_eps))
        keep = objective.group_keep_mask(reward, G) | ~use_keep
        tb = objective.make_train_batch(batch["prompt_tokens"], batch["prompt_mask"],
                                        samples.tokens, samples.logprobs, samples.lengths, adv, G,
                                        keep)
        if reference is not None:
            tb["ref_logprobs"], _ = objective.token_logprobs(
                reference, tb, model_cfg, float(config.sampling.temperature),
                int(config.rl.logits_chunk), g=shared, prompt_len=batch["prompt_tokens"].shape[1])
        correct = diag["correct"].reshape(-1, G)
        f32 = lambda x: jnp.mean(x.astype(jnp.float32))  # noqa: E731
        metrics = dict(reward=f32(reward), accuracy=f32(correct),
                       pass_at_g=f32(jnp.any(correct, axis=1)), boxed=f32(diag["has_box"]),
                       think_end=f32(diag["has_think_end"]), response_len=f32(samples.lengths),
                       truncated=f32(~samples.finished), kept_frac=f32(keep),
                       sampled_tokens=jnp.sum(samples.lengths))
        n = min(n_shown, batch["target_len"].shape[0])
        shown = {**{k: batch[k][:n] for k in ("context_tokens", "context_mask", "target_bytes",
                                               "target_len")},
                 "tokens": samples.tokens[:n * G], "lengths": samples.lengths[:n * G],
                 "finished": samples.finished[:n * G], "reward": reward[:n * G]}
        return tb, metrics, shown

    rows = sharding.batch_sharding(mesh, 1)
    mat = sharding.batch_sharding(mesh, 2)
    kl = ("ref_logprobs",) if config.rl.kl_coef else ()
    batch_out = {k: mat for k in ("tokens", "positions", "segment_ids", "loss_mask",
                                  "old_logprobs") + kl}
    batch_out["advantages"] = rows
    repl = sharding.replicated(mesh)
    jitted = jax.jit(fn, out_shardings=(batch_out, repl, repl))

    def run(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)
    run.jitted = jitted
    return run


def _json_number(x: float):
    """x, or "nan" / "inf" (JSON has no non-finite numbers), as metrics.jsonl writes them."""
    return x if np.isfinite(x) else str(x)


def records(shown: dict, tokenizer, think_end: str, G: int) -> list[dict]:
    """make_rollout's `shown` (fetched to the host) as one JSON-able record per context: the
    context's last SHOWN_CONTEXT_CHARS characters, the true continuation (target bytes as
    text), and its G samples, each with the response text (its exact bytes, special tokens
    included), the prediction the reward read (None: no box after think_end), the reward, the
    token count and whether a stop token ended it."""
    shown = {k: np.asarray(v) for k, v in shown.items()}

    def piece(i):  # ids beyond the tokenizer (the embedding's padding rows) have no bytes
        i = int(i)
        return (tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b"",
                i >= tokenizer.vocab_size or i in tokenizer.special_ids)

    out = []
    for b in range(len(shown["target_len"])):
        context = tokenizer.decode(shown["context_tokens"][b][shown["context_mask"][b] > 0])
        samples = []
        for r in range(b * G, (b + 1) * G):
            pieces, special = zip(*map(piece, shown["tokens"][r][:shown["lengths"][r]])) \
                if shown["lengths"][r] else ((), ())
            pred = reward_lib.reference_prediction(pieces, special, think_end.encode())["pred"]
            samples.append(dict(
                response=b"".join(pieces).decode("utf-8", "replace"),
                prediction=None if pred is None else pred.decode("utf-8", "replace"),
                reward=_json_number(float(shown["reward"][r])), tokens=int(shown["lengths"][r]),
                finished=bool(shown["finished"][r])))
        target = bytes(shown["target_bytes"][b][:shown["target_len"][b]])
        out.append(dict(context=context[-SHOWN_CONTEXT_CHARS:],
                        target=target.decode("utf-8", "replace"), samples=samples))
    return out
