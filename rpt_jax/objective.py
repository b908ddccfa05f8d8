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
    A group whose rewards are all equal gets advantage exactly 0 under both (the float32 mean of
    G equal rewards can be off by one rounding step, which the std would blow up).
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
    varied = r.max(axis=1, keepdims=True) > r.min(axis=1, keepdims=True)
    return jnp.where(varied, adv, 0.0).reshape(-1)


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
    # 0 outside the loss, dropped rows too: exp(new - old) there stays <= 1, never inf (inf
    # times a zero weight would be NaN)
    old = jnp.where(in_response_loss, sample_logprobs, 0.0).astype(jnp.float32)
    old_logprobs = jnp.concatenate([zeros_p, old, zero_end], axis=1)
    return {
        "tokens": jnp.concatenate([prompt, sample_tokens], axis=1).astype(jnp.int32),
        "positions": positions,
        "segment_ids": real.astype(jnp.int32),
        "loss_mask": loss_mask,
        "old_logprobs": old_logprobs,
        "advantages": advantages.astype(jnp.float32),
    }


def train_batch_shapes(B: int, P: int, R: int, G: int, ref_logprobs: bool = False) -> dict:
    """ShapeDtypeStructs of `make_train_batch`'s output for B contexts, prompt P, R response
    tokens, G samples each (plus ref_logprobs [B*G, P+R] with a KL reference): what the update
    compiles for."""
    n = B * G
    out = jax.eval_shape(lambda: make_train_batch(
        jnp.zeros((B, P), jnp.int32), jnp.ones((B, P), bool), jnp.zeros((n, R), jnp.int32),
        jnp.zeros((n, R), jnp.float32), jnp.full((n,), R), jnp.zeros((n,)), G))
    if ref_logprobs:
        out["ref_logprobs"] = out["old_logprobs"]
    return out


# ----------------------------------------------------------------------------- log-probs

def _logprobs_from_logits(logits, targets, temperature, entropy_grad):
    """logits float32 [n, c, v], targets [n, c] -> (log p(target), entropy) [n, c], softmax(z / T)."""
    z = logits / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    target = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(z - lse[..., None])
    entropy = lse - jnp.sum(probs * z, axis=-1)
    if not entropy_grad:  # a metric only: no backward pass over [n, c, v] for it
        entropy = jax.lax.stop_gradient(entropy)
    return target - lse, entropy


def _chunk_logprobs(params, h, targets, temperature, cfg, entropy_grad):
    """h [n, c, d], targets [n, c] -> (log p(target), entropy) [n, c] under softmax(logits / T)."""
    logits = model.logits_from_hidden(params, h, cfg)  # float32 [n, c, v]
    return _logprobs_from_logits(logits, targets, temperature, entropy_grad)


def token_logprobs(params, batch, cfg: model.ModelConfig, temperature: float, chunk: int = 256,
                   entropy_grad: bool = False, g: int = 1, prompt_len: int = 0):
    """Log-prob of each next token and the entropy of its distribution, softmax(logits / T).

    batch: tokens, positions, segment_ids, loss_mask [N, S]. Returns (logp, entropy) float32
    [N, S], aligned like loss_mask (index i scores token i + 1; the last index is 0). The
    entropy carries a gradient only with entropy_grad=True (for an entropy bonus).
    g > 1 and prompt_len = P (make_train_batch's rows, G = g): each prompt computed once
    (model.hidden_states_shared_prompt); the positions before P - 1, which score prompt
    tokens, are then 0.
    """
    if g > 1 and prompt_len:
        h = model.hidden_states_shared_prompt(params, batch["tokens"], cfg, batch["positions"],
                                              batch["segment_ids"], g, prompt_len)
        tail = lambda x: x[:, prompt_len - 1:]  # noqa: E731
        out = logprobs_from_hidden(params, h, tail(batch["tokens"]), tail(batch["loss_mask"]),
                                   cfg, temperature, chunk, entropy_grad)
        return tuple(jnp.pad(x, ((0, 0), (prompt_len - 1, 0))) for x in out)
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

def token_weights(loss_mask, agg: str, max_len: int = 0):
    """Per-token weights and the denominator of one aggregation mode. [N, S] -> ([N, S], count).

    loss = sum(weights * per_token_loss) / count, and both parts add up over row slices:
      token_mean:              weights = mask,                 count = #tokens
      seq_mean_token_mean:     weights = mask / row's #tokens, count = #rows with a token
      seq_mean_token_sum_norm: weights = mask / max_len,       count = #rows with a token
    (Dr. GRPO: a constant max_len, the response budget, instead of each row's length.)
    """
    mask = loss_mask.astype(jnp.float32)
    row_count = jnp.sum(mask, axis=1, keepdims=True)
    rows = jnp.sum((row_count > 0).astype(jnp.float32))
    if agg == "token_mean":
        return mask, jnp.sum(row_count)
    if agg == "seq_mean_token_mean":
        return mask / jnp.maximum(row_count, 1.0), rows
    if agg == "seq_mean_token_sum_norm":
        if not max_len:
            raise ValueError("loss_agg='seq_mean_token_sum_norm' needs max_len > 0 (the response "
                             "budget, sampling.max_new_tokens)")
        return mask / max_len, rows
    raise ValueError(f"rl.loss_agg={agg!r} is not one of {AGGREGATIONS}")


K3_CLAMP = 20.0  # ref - logp above this is clamped: exp stays finite (masked columns too)


def k3(logp, ref_logp):
    """k3 estimate of KL(p || ref) per token from samples of p: exp(d) - d - 1 >= 0 with
    d = ref - logp capped at K3_CLAMP, so that a column outside the loss (weight 0) whose
    log-probs are far apart cannot turn the loss or its gradient into 0 * inf = NaN. Below,
    nothing overflows: a policy far above the reference keeps its gradient, kl_coef * (1 - e^d)."""
    d = jnp.minimum(ref_logp - logp, K3_CLAMP)
    return jnp.exp(d) - d - 1.0


def per_token_loss(new_logp, old_logp, advantages, *, clip_low=0.2, clip_high=0.2, ref_logp=None,
                   kl_coef=0.0, entropy=None, entropy_coef=0.0):
    """Clipped importance-ratio surrogate per token (GRPO Eq. 3; DAPO Eq. 10 clip-higher).

    new_logp, old_logp [..., S]; advantages broadcastable to them (e.g. [N, 1]). Per token:
        -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)
        + kl_coef * k3(new, ref) - entropy_coef * H,     rho = exp(new - old)
    ref_logp is needed only when kl_coef > 0, entropy only when entropy_coef != 0.
    """
    ratio = jnp.exp(new_logp - old_logp)
    adv = advantages.astype(jnp.float32)
    loss = jnp.maximum(-ratio * adv, -jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv)
    if kl_coef:
        if ref_logp is None:
            raise ValueError("rl.kl_coef > 0 needs reference log-probs (ref_logp)")
        loss = loss + kl_coef * k3(new_logp, ref_logp)
    if entropy_coef:
        if entropy is None:
            raise ValueError("rl.entropy_coef != 0 needs the per-token entropy")
        loss = loss - entropy_coef * entropy
    return loss


def policy_stats(new_logp, old_logp, advantages, loss_mask, loss_sum, count, *, clip_low=0.2,
                 clip_high=0.2, ref_logp=None, kl_coef=0.0, entropy=None):
    """Metrics of one (micro-)batch as {"mean": {name: (sum, count)}, "max": {name: value}}.

    loss; clip_frac (tokens whose clipped term is the active one); approx_kl (k3 of the sampler's
    distribution against the trainer's, an estimate of KL(old || new)); logp_gap and
    logp_gap_max (|new - old| over response tokens: the sampler/trainer mismatch); entropy;
    kl_ref (k3 to the reference, when used). No gradient flows through any of them.
    """
    sg = jax.lax.stop_gradient
    mask = loss_mask.astype(jnp.float32)
    n_tok = jnp.sum(mask)
    adv = advantages.astype(jnp.float32)[:, None]
    log_ratio = sg(new_logp - old_logp)
    ratio = jnp.exp(log_ratio)
    clipped = -jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv > -ratio * adv
    gap = jnp.abs(log_ratio)
    means = {
        "loss": (sg(loss_sum), count),
        "clip_frac": (jnp.sum(clipped * mask), n_tok),
        "approx_kl": (jnp.sum((ratio - 1.0 - log_ratio) * mask), n_tok),
        "logp_gap": (jnp.sum(gap * mask), n_tok),
    }
    if entropy is not None:
        means["entropy"] = (jnp.sum(sg(entropy) * mask), n_tok)
    if kl_coef:
        means["kl_ref"] = (jnp.sum(k3(sg(new_logp), ref_logp) * mask), n_tok)
    return {"mean": means, "max": {"logp_gap_max": jnp.max(jnp.where(mask > 0, gap, 0.0))}}


def policy_loss(new_logp, old_logp, advantages, loss_mask, *, clip_low=0.2, clip_high=0.2,
                agg="token_mean", max_len=0, ref_logp=None, kl_coef=0.0, entropy=None,
                entropy_coef=0.0):
    """The GRPO/DAPO loss of a (micro-)batch as (loss_sum, count, stats).

    new_logp, old_logp, loss_mask [N, S] (aligned; mask 0 or 1); advantages [N]; ref_logp [N, S]
    when kl_coef > 0 (never needed otherwise); entropy [N, S] for the bonus and the metric (may
    be None). loss = loss_sum / count, with `per_token_loss` aggregated by `token_weights`.
    """
    weights, count = token_weights(loss_mask, agg, max_len)
    adv = advantages.astype(jnp.float32)[:, None]
    per_token = per_token_loss(new_logp, old_logp, adv, clip_low=clip_low, clip_high=clip_high,
                               ref_logp=ref_logp, kl_coef=kl_coef, entropy=entropy,
                               entropy_coef=entropy_coef)
    loss_sum = jnp.sum(weights * per_token)
    stats = policy_stats(new_logp, old_logp, advantages, loss_mask, loss_sum, count,
                         clip_low=clip_low, clip_high=clip_high, ref_logp=ref_logp,
                         kl_coef=kl_coef, entropy=entropy)
    return loss_sum, count, stats


def fused_policy_loss(params, h, batch, cfg: model.ModelConfig, temperature: float, *,
                      chunk: int = 256, clip_low=0.2, clip_high=0.2, agg="token_mean",
                      max_len=0, kl_coef=0.0, entropy_coef=0.0):
    """`policy_loss` of the LM head on h [N, S, d], its gradient computed in the same pass.

    Same value, gradient and stats as token_logprobs + policy_loss, but each chunk of positions
    runs the LM head forward and backward at once (the per-token loss is a function of that
    token's log-prob alone), so the backward neither recomputes nor stores [N, chunk, V] logits:
    three LM-head matmuls instead of four. Returns (loss_sum, count, stats); differentiable in
    params (norm and LM head / tied embedding) and h. batch: make_train_batch's dict
    (+ ref_logprobs when kl_coef > 0).
    """
    tokens, mask = batch["tokens"], batch["loss_mask"]
    N, S = tokens.shape
    weights, count = token_weights(mask, agg, max_len)
    head_keys = ("norm", "embed_tokens" if cfg.tie_embeddings else "lm_head")
    head = {k: params[k] for k in head_keys}
    data = {"targets": jnp.concatenate([tokens[:, 1:], jnp.zeros((N, 1), tokens.dtype)], axis=1),
            "weights": weights, "old": batch["old_logprobs"],
            "adv": jnp.broadcast_to(batch["advantages"].astype(jnp.float32)[:, None], (N, S))}
    if kl_coef:
        if "ref_logprobs" not in batch:
            raise ValueError("rl.kl_coef > 0 needs batch['ref_logprobs']")
        data["ref"] = batch["ref_logprobs"]
    chunk = min(chunk, S)
    pad = -S % chunk
    n_chunks = (S + pad) // chunk

    def split(x):  # [N, S, ...] -> [chunks, N, chunk, ...]; the batch axis stays where it was
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        return jnp.swapaxes(x.reshape(N, n_chunks, chunk, *x.shape[2:]), 0, 1)

    def unsplit(x):
        return jnp.swapaxes(x, 0, 1).reshape(N, S + pad, *x.shape[3:])[:, :S]

    tied = cfg.tie_embeddings
    w_key = "embed_tokens" if tied else "lm_head"

    def token_loss(logits, d):
        logp, ent = _logprobs_from_logits(logits, d["targets"], temperature, bool(entropy_coef))
        per_token = per_token_loss(logp, d["old"], d["adv"], clip_low=clip_low,
                                   clip_high=clip_high, ref_logp=d.get("ref"), kl_coef=kl_coef,
                                   entropy=ent, entropy_coef=entropy_coef)
        return jnp.sum(d["weights"] * per_token), (logp, ent)

    def grad_chunk(hp, h_c, d):
        # model.logits_from_hidden written out (final norm, then the LM head; the test checks
        # it against that function) so that the two backward matmuls take the logits' cotangent
        # in the compute dtype, as every other matmul of the step does; autodiff of the float32
        # logits would run them in float32.
        hn, norm_vjp = jax.vjp(lambda w, x: model.rms_norm(x, w, cfg.rms_norm_eps), hp["norm"], h_c)
        w = hp[w_key].astype(hn.dtype)
        spec = "ncd,vd->ncv" if tied else "ncd,dv->ncv"
        logits = jnp.einsum(spec, hn, w, preferred_element_type=jnp.float32)
        (loss, aux), g_logits = jax.value_and_grad(token_loss, has_aux=True)(logits, d)
        g_logits = g_logits.astype(hn.dtype)
        g_hn = jnp.einsum("ncv,vd->ncd" if tied else "ncv,dv->ncd", g_logits, w,
                          preferred_element_type=jnp.float32)
        g_w = jnp.einsum("ncv,ncd->vd" if tied else "ncv,ncd->dv", g_logits, hn,
                         preferred_element_type=jnp.float32)
        g_norm, g_h = norm_vjp(g_hn.astype(hn.dtype))
        grads = {"norm": g_norm.astype(hp["norm"].dtype), w_key: g_w.astype(hp[w_key].dtype)}
        return (loss, aux), (grads, g_h)

    def forward_and_grads(hp, h, data):
        def body(carry, xs):
            h_c, d = xs

            def compute(carry):
                (loss, (logp, ent)), (g_hp, g_h) = grad_chunk(hp, h_c, d)
                return ((carry[0] + loss, jax.tree.map(jnp.add, carry[1], g_hp)),
                        (logp, ent, g_h))

            def skip(carry):  # no loss token in this chunk (prompt region, tail)
                zero = jnp.zeros(d["targets"].shape, jnp.float32)
                return carry, (zero, zero, jnp.zeros_like(h_c))

            return jax.lax.cond(jnp.any(d["weights"] != 0), compute, skip, carry)

        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, hp))
        (loss_sum, g_hp), (logp, ent, g_h) = jax.lax.scan(
            body, init, (split(h), jax.tree.map(split, data)))
        return (loss_sum, unsplit(logp), unsplit(ent)), (g_hp, unsplit(g_h))

    @jax.custom_vjp
    def fused(hp, h, data):  # called without differentiation it still computes the grads
        return forward_and_grads(hp, h, data)[0]

    def fused_bwd(grads, ct):
        g_hp, g_h = grads
        ct_loss = ct[0]  # logp and entropy are outputs for the metrics only
        return (jax.tree.map(lambda g: (ct_loss * g).astype(g.dtype), g_hp),
                (ct_loss * g_h).astype(g_h.dtype), None)

    fused.defvjp(forward_and_grads, fused_bwd)
    loss_sum, logp, ent = fused(head, h, data)
    stats = policy_stats(logp, batch["old_logprobs"], batch["advantages"], mask, loss_sum, count,
                         clip_low=clip_low, clip_high=clip_high, ref_logp=data.get("ref"),
                         kl_coef=kl_coef, entropy=ent)
    return loss_sum, count, stats


def combine_stats(a, b):
    """Accumulate two stats dicts from `policy_loss` (sums and counts add, maxima take the max)."""
    return {"mean": jax.tree.map(jnp.add, a["mean"], b["mean"]),
            "max": jax.tree.map(jnp.maximum, a["max"], b["max"])}


def finalize_stats(stats) -> dict:
    """Stats -> flat dict of scalars: each mean as sum / count (0 where count is 0), each max."""
    out = {k: s / jnp.maximum(c, 1.0) for k, (s, c) in stats["mean"].items()}
    out.update(stats["max"])
    return out
