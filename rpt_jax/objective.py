"""GRPO objective: group advantages, per-token log-probs, the clipped surrogate loss.

Shapes: N = B * G sampled rows (row b*G + g is sample g of context b), S = P + R tokens per row
(prompt then response), V vocab. A row's arrays are aligned on the *predicting* position: index i
of `loss_mask`, `old_logprobs` and the log-probs below refers to token i + 1, predicted by the
logits at position i.

Every loss and metric comes back as a (sum, count) pair (or a max), so that summing over
micro-batches and dividing once gives exactly the full-batch value.

References: GRPO, Shao et al. 2024 (arXiv 2402.03300) Eq. 3 and Sec. 4.1.2; Dr. GRPO, Liu et al.
2025 (arXiv 2503.20783) Sec. 3.1; DAPO, Yu et al. 2025 (arXiv 2503.14476) Eq. 8-11 (clip-higher,
dynamic sampling, token-level loss); k3 KL estimator, Schulman 2020 ("Approximating KL divergence").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rpt_jax import model

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


# ----------------------------------------------------------------------------- advantages

def _groups(rewards, G):
    if G < 2:
        raise ValueError(f"a group baseline needs G >= 2 samples per context, got G={G}")
    if rewards.ndim != 1 or rewards.shape[0] % G:
        raise ValueError(f"rewards must be [N] with N a multiple of G={G}, got {rewards.shape}")
    return rewards.reshape(-1, G).astype(jnp.float32)


def group_advantages(rewards, G: int, kind: str = "grpo", eps: float = 1e-6):
    """Advantages relative to the other samples of the same context. rewards [N] -> [N] float32.

    grpo:    (r - mean_g) / (std_g + eps), std_g the *sample* standard deviation (ddof=1) of the
             group, as TRL, verl and Tunix compute it (torch.std is unbiased), so advantages match
             those frameworks'. GRPO paper Sec. 4.1.2.
    dr_grpo: r - mean_g (Dr. GRPO drops the std, which up-weights near-uniform groups).
    A group whose rewards are all equal gets advantage 0 under both.
    """
    r = _groups(rewards, G)
    centred = r - r.mean(axis=1, keepdims=True)
    if kind == "grpo":
        std = jnp.sqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / (G - 1))
        adv = centred / (std + eps)
    elif kind == "dr_grpo":
        adv = centred
    else:
        raise ValueError(f"rl.advantage={kind!r} is not one of ('grpo', 'dr_grpo')")
    return adv.reshape(-1)


def group_keep_mask(rewards, G: int):
    """DAPO dynamic sampling: rows whose group's G rewards are not all equal. [N] -> [N] bool.

    A dropped group has zero advantage anyway; dropping it also removes its tokens from the loss
    denominators. The kept fraction is `keep.mean()`.
    """
    r = _groups(rewards, G)
    keep = r.max(axis=1) > r.min(axis=1)
    return jnp.repeat(keep, G)


# ----------------------------------------------------------------------------- batch layout

def make_train_batch(prompt_tokens, prompt_mask, sample_tokens, sample_logprobs, lengths,
                     advantages, G: int, keep=None) -> dict:
    """Prompt + response rows in the trainer's layout; jittable.

    prompt_tokens, prompt_mask [B, P] (left padded: real tokens end at P-1, at least one real);
    sample_tokens, sample_logprobs [N, R] with N = B*G (row b*G+g is sample g of context b);
    lengths [N] response tokens that count (the sampler's logprobs are 0 after them);
    advantages [N]; keep [N] bool or None (DAPO dynamic sampling: False rows get no loss).
    Returns dict of [N, S=P+R]: tokens, positions (0 at a row's first real token), segment_ids
    (1 real, 0 padding or after the response end), loss_mask (float32, 1 where the NEXT token is a
    response token within length), old_logprobs (aligned like loss_mask); and advantages [N].
    """
    B, P = prompt_tokens.shape
    N, R = sample_tokens.shape
    if N != B * G or sample_logprobs.shape != (N, R) or lengths.shape != (N,) \
            or advantages.shape != (N,) or prompt_mask.shape != (B, P):
        raise ValueError(
            f"make_train_batch: expected prompt_tokens/prompt_mask [B, P], samples/logprobs [B*G, R], "
            f"lengths/advantages [B*G] with G={G}; got prompt {prompt_tokens.shape}, mask "
            f"{prompt_mask.shape}, samples {sample_tokens.shape}, logprobs {sample_logprobs.shape}, "
            f"lengths {lengths.shape}, advantages {advantages.shape}")
    prompt = jnp.repeat(prompt_tokens, G, axis=0)
    pmask = jnp.repeat(prompt_mask.astype(bool), G, axis=0)
    in_response = jnp.arange(R)[None, :] < lengths[:, None]  # [N, R]
    if keep is not None:
        in_response_loss = in_response & keep[:, None]
    else:
        in_response_loss = in_response
    real = jnp.concatenate([pmask, in_response], axis=1)
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)
    # Response token j sits at P + j and is predicted at P - 1 + j: shift left by one.
    zeros_p = jnp.zeros((N, P - 1), jnp.float32)
    zero_end = jnp.zeros((N, 1), jnp.float32)
    loss_mask = jnp.concatenate([zeros_p, in_response_loss.astype(jnp.float32), zero_end], axis=1)
    old = jnp.where(in_response, sample_logprobs, 0.0).astype(jnp.float32)
    old_logprobs = jnp.concatenate([zeros_p, old, zero_end], axis=1)
    return {
        "tokens": jnp.concatenate([prompt, sample_tokens], axis=1).astype(jnp.int32),
        "positions": positions,
        "segment_ids": real.astype(jnp.int32),
        "loss_mask": loss_mask,
        "old_logprobs": old_logprobs,
        "advantages": advantages.astype(jnp.float32),
    }


# ----------------------------------------------------------------------------- log-probs

def _chunk_logprobs(params, h, targets, temperature, cfg, entropy_grad):
    """h [n, c, d], targets [n, c] -> (log p(target), entropy) [n, c] under softmax(logits / T)."""
    z = model.logits_from_hidden(params, h, cfg) / temperature  # float32 [n, c, v]
    lse = jax.nn.logsumexp(z, axis=-1)
    target = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(z - lse[..., None])
    entropy = lse - jnp.sum(probs * z, axis=-1)
    if not entropy_grad:  # a metric only: no backward pass over [n, c, v] for it
        entropy = jax.lax.stop_gradient(entropy)
    return target - lse, entropy


def token_logprobs(params, batch, cfg: model.ModelConfig, temperature: float, chunk: int = 256,
                   entropy_grad: bool = False):
    """Log-prob of each next token and the entropy of its distribution, softmax(logits / T).

    batch: tokens, positions, segment_ids, loss_mask [N, S]. Returns (logp, entropy) float32
    [N, S], aligned like loss_mask (index i scores token i + 1; the last index is 0). The
    entropy carries a gradient only with entropy_grad=True (for an entropy bonus).
    """
    h, _ = model.hidden_states(params, batch["tokens"], cfg, batch["positions"],
                               batch["segment_ids"])
    return logprobs_from_hidden(params, h, batch["tokens"], batch["loss_mask"], cfg, temperature,
                                chunk, entropy_grad)


def logprobs_from_hidden(params, h, tokens, loss_mask, cfg: model.ModelConfig,
                         temperature: float, chunk: int = 256, entropy_grad: bool = False):
    """`token_logprobs` from the last hidden states h [N, S, d] (before the final norm).

    The LM head runs over `chunk` positions at a time under remat, so at most [N, chunk, V]
    float32 logits exist at once, in the forward and in the backward. Chunks with no loss token
    (the prompt region, the tail after the longest response) skip the LM head entirely.
    """
    N, S = tokens.shape
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((N, 1), tokens.dtype)], axis=1)
    mask = loss_mask
    chunk = min(chunk, S)
    pad = -S % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n_chunks = (S + pad) // chunk

    def split(x):  # [N, S', ...] -> [chunks, N, chunk, ...]; the batch axis stays where it was
        return jnp.swapaxes(x.reshape(N, n_chunks, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint  # keep only h per chunk for the backward, never the [N, chunk, V] logits
    def one(h_c, t_c, m_c):
        def compute(_):
            return _chunk_logprobs(params, h_c, t_c, temperature, cfg, entropy_grad)

        def skip(_):
            zero = jnp.zeros(t_c.shape, jnp.float32)
            return zero, zero

        return jax.lax.cond(jnp.any(m_c > 0), compute, skip, None)

    def body(carry, xs):
        return carry, one(*xs)

    _, (logp, entropy) = jax.lax.scan(body, None, (split(h), split(targets), split(mask)))
    unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(N, S + pad)[:, :S]  # noqa: E731
    return unsplit(logp), unsplit(entropy)


# ----------------------------------------------------------------------------- loss

def _aggregate(per_token, mask, agg, max_len):
    """(sum, count) of a masked [N, S] quantity under one aggregation mode."""
    row_sum = jnp.sum(per_token * mask, axis=1)
    row_count = jnp.sum(mask, axis=1)
    if agg == "token_mean":
        return jnp.sum(row_sum), jnp.sum(row_count)
    rows = (row_count > 0).astype(jnp.float32)
    if agg == "seq_mean_token_mean":
        return jnp.sum(row_sum / jnp.maximum(row_count, 1.0)), jnp.sum(rows)
    if agg == "seq_mean_token_sum_norm":
        if not max_len:
            raise ValueError("loss_agg='seq_mean_token_sum_norm' needs max_len > 0 (the response "
                             "budget, sampling.max_new_tokens)")
        return jnp.sum(row_sum) / max_len, jnp.sum(rows)
    raise ValueError(f"rl.loss_agg={agg!r} is not one of {AGGREGATIONS}")


def k3(logp, ref_logp):
    """k3 estimate of KL(p || ref) per token from samples of p: exp(ref-logp) - (ref-logp) - 1 >= 0."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def policy_loss(new_logp, old_logp, advantages, loss_mask, *, clip_low=0.2, clip_high=0.2,
                agg="token_mean", max_len=0, ref_logp=None, kl_coef=0.0, entropy=None,
                entropy_coef=0.0):
    """Clipped importance-ratio surrogate (GRPO Eq. 3, DAPO clip-higher), as (sum, count).

    new_logp, old_logp, loss_mask [N, S] (aligned; mask 0 or 1); advantages [N]; ref_logp [N, S]
    when kl_coef > 0 (k3 penalty, never needed otherwise); entropy [N, S] for the bonus and the
    metric (may be None). Per token:
        loss = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)
               + kl_coef * k3(new, ref) - entropy_coef * H,    rho = exp(new - old)
    aggregated by `agg` (token_mean | seq_mean_token_mean | seq_mean_token_sum_norm / max_len).
    Returns (loss_sum, count, stats) with stats = {"mean": {name: (sum, count)}, "max": {...}}.
    """
    mask = loss_mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    log_ratio = new_logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = -ratio * adv
    clipped = -jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = jnp.maximum(unclipped, clipped)
    means = {}
    if kl_coef:
        if ref_logp is None:
            raise ValueError("rl.kl_coef > 0 needs reference log-probs (ref_logp)")
        kl = k3(new_logp, ref_logp)
        per_token = per_token + kl_coef * kl
        means["kl_ref"] = (jnp.sum(kl * mask), jnp.sum(mask))
    if entropy_coef:
        if entropy is None:
            raise ValueError("rl.entropy_coef != 0 needs the per-token entropy")
        per_token = per_token - entropy_coef * entropy
    loss_sum, count = _aggregate(per_token, mask, agg, max_len)

    n_tok = jnp.sum(mask)
    sg = jax.lax.stop_gradient
    gap = jnp.abs(sg(log_ratio))
    means["loss"] = (sg(loss_sum), count)
    means["clip_frac"] = (jnp.sum((clipped > unclipped) * mask), n_tok)
    # k3 of the sampler's distribution against the trainer's: an estimate of KL(old || new).
    means["approx_kl"] = (jnp.sum(sg(ratio - 1.0 - log_ratio) * mask), n_tok)
    means["logp_gap"] = (jnp.sum(gap * mask), n_tok)
    if entropy is not None:
        means["entropy"] = (jnp.sum(sg(entropy) * mask), n_tok)
    maxes = {"logp_gap_max": jnp.max(jnp.where(mask > 0, gap, 0.0))}
    return loss_sum, count, {"mean": means, "max": maxes}


def combine_stats(a, b):
    """Accumulate two stats dicts from `policy_loss` (sums and counts add, maxima take the max)."""
    return {"mean": jax.tree.map(jnp.add, a["mean"], b["mean"]),
            "max": jax.tree.map(jnp.maximum, a["max"], b["max"])}


def finalize_stats(stats) -> dict:
    """Stats -> flat dict of scalars: each mean as sum / count (0 where count is 0), each max."""
    out = {k: s / jnp.maximum(c, 1.0) for k, (s, c) in stats["mean"].items()}
    out.update(stats["max"])
    return out
