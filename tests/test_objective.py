"""Objective: hand-worked advantages and batch layout, the loss against a numpy reference,
exact (sum, count) accumulation, k3 KL, chunked log-probs against a plain forward."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rpt_jax import model, objective

CFG = model.ModelConfig(vocab_size=64, num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2,
                        head_dim=8, mlp_dim=64, qkv_bias=True, tie_embeddings=False)


# ----------------------------------------------------------------------------- advantages

def test_grpo_advantages_by_hand():
    rewards = jnp.array([1., 0., 0., 0.,  2., 0., 1., 1.,  1., 1., 1., 1.])
    adv = objective.group_advantages(rewards, 4, "grpo", eps=0.0 + 1e-12)
    # Group 1: mean 1/4, deviations (3/4, -1/4 x3), sample variance (9/16 + 3/16) / 3 = 1/4.
    # Group 2: mean 1, deviations (1, -1, 0, 0), sample variance 2/3.
    s = np.sqrt(2 / 3)
    want = [1.5, -0.5, -0.5, -0.5, 1 / s, -1 / s, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-7)


def test_dr_grpo_advantages_and_eps():
    rewards = jnp.array([1., 0., 0., 0., 1., 1., 1., 1.])
    np.testing.assert_allclose(objective.group_advantages(rewards, 4, "dr_grpo"),
                               [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], atol=1e-7)
    # eps is added to the std: with eps = 0.5, the first group is divided by 1.0.
    np.testing.assert_allclose(objective.group_advantages(rewards, 4, "grpo", eps=0.5)[:4],
                               [0.75, -0.25, -0.25, -0.25], atol=1e-7)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo"])
def test_equal_rewards_give_exactly_zero_advantage(kind):
    """Dense rewards: a group's wrong samples all get the true token's probability. Their float32
    mean can be one rounding step off (0.9 x 8: 0.90000004), which the std used to blow up into
    advantages of +-0.06 for every sample."""
    rng = np.random.default_rng(0)
    equal = np.repeat(rng.random(256).astype(np.float32), 8)
    equal[:8] = 0.9
    mixed = np.array([0.9] * 7 + [1.0], np.float32)
    adv = objective.group_advantages(jnp.asarray(np.concatenate([equal, mixed])), 8, kind)
    assert np.all(np.asarray(adv[:-8]) == 0.0)
    assert np.all(np.asarray(adv[-8:]) != 0.0)


def test_keep_mask_drops_equal_groups():
    rewards = jnp.array([1., 0., 1., 0., 0., 0., 0.5, 0.5, 0.5])
    keep = objective.group_keep_mask(rewards, 3)
    np.testing.assert_array_equal(keep, [1, 1, 1, 0, 0, 0, 0, 0, 0])


def test_advantage_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        objective.group_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="multiple of G"):
        objective.group_advantages(jnp.ones(5), 2)
    with pytest.raises(ValueError, match="rl.advantage"):
        objective.group_advantages(jnp.ones(4), 2, "ppo")


# ----------------------------------------------------------------------------- batch layout

def test_make_train_batch_by_hand():
    # B=2 contexts, G=2, P=3 (left padded), R=3.
    prompt = jnp.array([[0, 5, 6], [7, 8, 9]])
    pmask = jnp.array([[0, 1, 1], [1, 1, 1]])
    samples = jnp.array([[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]])
    logp = -jnp.arange(1, 13, dtype=jnp.float32).reshape(4, 3) / 10
    lengths = jnp.array([3, 1, 0, 2])
    adv = jnp.array([1., -1., 0.5, -0.5])
    b = objective.make_train_batch(prompt, pmask, samples, logp, lengths, adv, G=2,
                                   keep=jnp.array([1, 1, 0, 1], bool))
    np.testing.assert_array_equal(b["tokens"], [[0, 5, 6, 11, 12, 13], [0, 5, 6, 21, 22, 23],
                                                [7, 8, 9, 31, 32, 33], [7, 8, 9, 41, 42, 43]])
    np.testing.assert_array_equal(b["segment_ids"], [[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0],
                                                     [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(b["positions"][:, 1:], [[0, 1, 2, 3, 4], [0, 1, 2, 2, 2],
                                                          [1, 2, 2, 2, 2], [1, 2, 3, 4, 4]])
    np.testing.assert_array_equal(b["positions"][2:, 0], [0, 0])
    # Position i predicts token i + 1; row 2 is dropped (keep False) and has length 0 anyway.
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0],
                                                   [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]])
    np.testing.assert_allclose(b["old_logprobs"], [[0, 0, -.1, -.2, -.3, 0], [0, 0, -.4, 0, 0, 0],
                                                   [0] * 6, [0, 0, -1.0, -1.1, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(b["advantages"], adv)
    # a dropped row's sampler log-probs are left out too: a far-off one cannot make rho inf
    far = logp.at[0].set(-1000.0)
    dropped = objective.make_train_batch(prompt, pmask, samples, far, lengths, adv, G=2,
                                         keep=jnp.array([0, 1, 0, 1], bool))
    np.testing.assert_array_equal(dropped["old_logprobs"][0], 0.0)
    np.testing.assert_array_equal(dropped["old_logprobs"][1:], b["old_logprobs"][1:])
    jitted = jax.jit(objective.make_train_batch, static_argnums=6)(
        prompt, pmask, samples, logp, lengths, adv, 2)
    np.testing.assert_array_equal(jitted["loss_mask"][2], [0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="B\\*G"):
        objective.make_train_batch(prompt, pmask, samples, logp, lengths, adv, G=3)


# ----------------------------------------------------------------------------- loss

def _np_loss(new, old, adv, mask, cl, ch, agg, max_len, ref=None, kl_coef=0.0, ent=None,
             ent_coef=0.0):
    """Plain-python per-token loop of the GRPO/DAPO surrogate and the three aggregations."""
    rows = []
    for n in range(new.shape[0]):
        terms = []
        for i in range(new.shape[1]):
            if not mask[n, i]:
                continue
            rho = np.exp(np.float64(new[n, i]) - old[n, i])
            obj = min(rho * adv[n], min(max(rho, 1 - cl), 1 + ch) * adv[n])
            term = -obj
            if kl_coef:
                d = ref[n, i] - new[n, i]
                term += kl_coef * (np.exp(d) - d - 1)
            if ent_coef:
                term -= ent_coef * ent[n, i]
            terms.append(term)
        rows.append(terms)
    if agg == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    kept = [r for r in rows if r]
    if agg == "seq_mean_token_mean":
        return np.mean([np.mean(r) for r in kept])
    return np.mean([sum(r) / max_len for r in kept])


def _random_inputs(seed, n=6, s=9):
    rng = np.random.default_rng(seed)
    new = rng.normal(-2, 1, (n, s)).astype(np.float32)
    old = (new + rng.normal(0, 0.3, (n, s))).astype(np.float32)  # ratios both sides of the clip
    adv = rng.normal(0, 1, n).astype(np.float32)
    mask = (rng.random((n, s)) < 0.6).astype(np.float32)
    mask[0] = 0  # a row without loss tokens
    ref = (new + rng.normal(0, 0.2, (n, s))).astype(np.float32)
    ent = rng.random((n, s)).astype(np.float32)
    return new, old, adv, mask, ref, ent


@pytest.mark.parametrize("agg", objective.AGGREGATIONS)
def test_policy_loss_matches_reference(agg):
    new, old, adv, mask, ref, ent = _random_inputs(0)
    kw = dict(clip_low=0.2, clip_high=0.28, agg=agg, max_len=12, kl_coef=0.1, entropy_coef=0.01)
    s, c, stats = objective.policy_loss(new, old, adv, mask, ref_logp=ref, entropy=ent, **kw)
    want = _np_loss(new, old, adv, mask, 0.2, 0.28, agg, 12, ref, 0.1, ent, 0.01)
    np.testing.assert_allclose(s / c, want, rtol=1e-5)
    m = objective.finalize_stats(stats)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    on = mask > 0
    ratio = np.exp(new.astype(np.float64) - old)
    a = np.broadcast_to(adv[:, None], new.shape)
    clipped_active = -np.clip(ratio, 0.8, 1.28) * a > -ratio * a
    np.testing.assert_allclose(m["clip_frac"], clipped_active[on].mean(), rtol=1e-6)
    assert 0 < m["clip_frac"] < 1
    np.testing.assert_allclose(m["logp_gap"], np.abs(new - old)[on].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["logp_gap_max"], np.abs(new - old)[on].max(), rtol=1e-6)
    np.testing.assert_allclose(m["approx_kl"], (ratio - 1 - np.log(ratio))[on].mean(), rtol=1e-4)
    np.testing.assert_allclose(m["entropy"], ent[on].mean(), rtol=1e-6)


def test_clip_high_is_asymmetric():
    # Positive advantage, ratio 1.25: clipped at 1.2 with symmetric clipping, not with 1.28.
    new, old = jnp.log(jnp.array([[1.25]])), jnp.zeros((1, 1))
    adv, mask = jnp.ones(1), jnp.ones((1, 1))
    s, _, st_sym = objective.policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.2)
    s2, _, st_asym = objective.policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose([s, s2], [-1.2, -1.25], rtol=1e-6)
    assert st_sym["mean"]["clip_frac"][0] == 1 and st_asym["mean"]["clip_frac"][0] == 0
    # Clipped tokens pass no gradient; unclipped ones pass -A * rho.
    g = jax.grad(lambda x: objective.policy_loss(x, old, adv, mask, clip_low=0.2,
                                                 clip_high=0.2)[0])(new)
    g2 = jax.grad(lambda x: objective.policy_loss(x, old, adv, mask, clip_low=0.2,
                                                  clip_high=0.28)[0])(new)
    np.testing.assert_allclose([g[0, 0], g2[0, 0]], [0.0, -1.25], rtol=1e-6)


@functools.partial(jax.jit, static_argnums=6)
def _full_and_parts(new, old, adv, mask, ref, ent, agg):
    """(full-batch stats, stats summed over uneven row slices 1 + 5 + 6) in one compiled program."""
    kw = dict(clip_low=0.2, clip_high=0.3, agg=agg, max_len=9, kl_coef=0.05, entropy_coef=0.02)
    full = objective.policy_loss(new, old, adv, mask, ref_logp=ref, entropy=ent, **kw)
    total = None
    for lo, hi in ((0, 1), (1, 6), (6, 12)):
        part = objective.policy_loss(new[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi],
                                     ref_logp=ref[lo:hi], entropy=ent[lo:hi], **kw)
        total = part if total is None else (total[0] + part[0], total[1] + part[1],
                                            objective.combine_stats(total[2], part[2]))
    return full, total


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), agg=st.sampled_from(objective.AGGREGATIONS))
def test_sums_and_counts_accumulate_exactly(seed, agg):
    """Splitting rows into micro-batches and adding (sum, count) gives the full-batch value."""
    new, old, adv, mask, ref, ent = _random_inputs(seed, n=12)
    (s, c, stats), total = _full_and_parts(new, old, adv, mask, ref, ent, agg)
    # Equal up to float32 summation order (the terms have both signs: an absolute tolerance).
    np.testing.assert_allclose(total[0] / total[1], s / c, rtol=1e-5, atol=1e-6)
    assert total[1] == c
    full, acc = objective.finalize_stats(stats), objective.finalize_stats(total[2])
    for k in full:
        np.testing.assert_allclose(acc[k], full[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_k3_expectation_is_exact_kl_and_zero_at_reference():
    rng = np.random.default_rng(1)
    logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=50)))
    logq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=50)))
    # E_p[k3] = E_p[q/p] - E_p[log q/p] - 1 = KL(p || q) exactly, since E_p[q/p] = 1.
    kl = jnp.sum(jnp.exp(logp) * (logp - logq))
    np.testing.assert_allclose(jnp.sum(jnp.exp(logp) * objective.k3(logp, logq)), kl, rtol=1e-5)
    assert jnp.all(objective.k3(logp, logq) >= 0)
    new, old, adv, mask, _, _ = _random_inputs(2)
    _, _, stats = objective.policy_loss(new, old, adv, mask, ref_logp=new, kl_coef=1.0)
    assert objective.finalize_stats(stats)["kl_ref"] == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        objective.policy_loss(new, old, adv, mask, kl_coef=0.1)


def test_k3_outside_the_loss_cannot_make_it_nan():
    """A column with weight 0 whose log-probs are far apart (a prompt column the reference did
    not score, logp -95 against 0): exp(ref - logp) overflows; 0 * inf used to give NaN loss,
    gradient and kl_ref."""
    new, old, adv, mask, ref, _ = _random_inputs(3)
    new[1, 0], ref[1, 0], mask[1, 0] = -95.0, 0.0, 0.0
    loss_of = lambda n: objective.policy_loss(n, old, adv, mask, ref_logp=ref, kl_coef=0.5)  # noqa: E731
    loss_sum, count, stats = loss_of(jnp.asarray(new))
    grad = jax.grad(lambda n: loss_of(n)[0])(jnp.asarray(new))
    assert np.isfinite(float(loss_sum)) and np.all(np.isfinite(np.asarray(grad)))
    assert grad[1, 0] == 0.0 and np.isfinite(objective.finalize_stats(stats)["kl_ref"])
    inside = mask == 1  # the loss over the columns inside it is what it was
    want = objective.policy_loss(new, old, adv, mask, ref_logp=np.where(inside, ref, new),
                                 kl_coef=0.5)[0]
    np.testing.assert_allclose(loss_sum, want, rtol=1e-6)


def test_k3_pulls_back_a_policy_far_above_the_reference():
    """logp - ref = 30 nats: k3 = e^-30 + 29 and its gradient in logp 1 - e^-30 (numpy)."""
    logp, ref = jnp.float32(0.0), jnp.float32(-30.0)
    np.testing.assert_allclose(objective.k3(logp, ref), np.exp(-30.0) + 29.0, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(objective.k3)(logp, ref), 1.0 - np.exp(-30.0), rtol=1e-6)


# ----------------------------------------------------------------------------- log-probs

_token_logprobs = jax.jit(objective.token_logprobs, static_argnums=(2, 3, 4))


def random_params(cfg, seed):
    """Params drawn with numpy (no compile): norms near 1, biases and matrices near 0."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(("norm" in jax.tree_util.keystr(path))
                                    + rng.normal(0, 0.1, s.shape), jnp.float32),
        model.param_shapes(cfg))


@pytest.fixture(scope="module")
def tiny():
    params = random_params(CFG, seed=0)
    rng = np.random.default_rng(0)
    n, s = 3, 13
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (n, s)), jnp.int32)
    seg = np.ones((n, s), np.int32)
    seg[1, :2] = 0  # left padding
    seg[2, 10:] = 0  # after the response end
    positions = np.maximum(np.cumsum(seg, 1) - 1, 0)
    mask = np.zeros((n, s), np.float32)
    mask[:, 5:12] = seg[:, 6:13]  # loss on tokens 6..12 where real
    batch = dict(tokens=tokens, positions=jnp.asarray(positions), segment_ids=jnp.asarray(seg),
                 loss_mask=jnp.asarray(mask))
    return params, batch


def test_token_logprobs_match_plain_forward(tiny):
    params, batch = tiny
    T = 0.7
    logits = jax.jit(model.forward, static_argnums=2)(
        params, batch["tokens"], CFG, batch["positions"], batch["segment_ids"])
    logq = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64) / T, axis=-1))
    tok = np.asarray(batch["tokens"])
    want = np.zeros(tok.shape)
    want_h = np.zeros(tok.shape)
    for n in range(tok.shape[0]):
        for i in range(tok.shape[1] - 1):
            want[n, i] = logq[n, i, tok[n, i + 1]]
            want_h[n, i] = -np.sum(np.exp(logq[n, i]) * logq[n, i])
    on = np.asarray(batch["loss_mask"]) > 0
    fn = _token_logprobs
    for chunk in (5, 4):  # 13 positions: uneven chunks
        logp, ent = fn(params, batch, CFG, T, chunk)
        np.testing.assert_allclose(np.asarray(logp)[on], want[on], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ent)[on], want_h[on], rtol=1e-5, atol=1e-5)
    # Chunk 4: positions 0..3 hold no loss token, so the LM head was skipped there.
    assert np.all(np.asarray(logp)[:, :4] == 0) and np.all(np.asarray(ent)[:, :4] == 0)


def test_token_logprobs_with_each_prompt_once_match_whole_rows(tiny):
    """g > 1, prompt_len = P (the KL reference's forward): equal to whole rows at every loss
    position, 0 before P - 1."""
    params, _ = tiny
    rng = np.random.default_rng(3)
    b, g, p, r = 2, 3, 5, 4
    prompt = jnp.asarray(rng.integers(1, CFG.vocab_size, (b, p)), jnp.int32)
    pmask = jnp.asarray(np.arange(p)[None] >= np.array([[0], [2]]))
    batch = objective.make_train_batch(
        prompt, pmask, jnp.asarray(rng.integers(1, CFG.vocab_size, (b * g, r)), jnp.int32),
        jnp.zeros((b * g, r)), jnp.asarray(rng.integers(1, r + 1, b * g), jnp.int32),
        jnp.zeros(b * g), g)
    want, _ = _token_logprobs(params, batch, CFG, 0.7, 4)
    got, _ = objective.token_logprobs(params, batch, CFG, 0.7, 4, g=g, prompt_len=p)
    on = np.asarray(batch["loss_mask"]) > 0
    assert got.shape == want.shape and on.sum() > 0
    np.testing.assert_allclose(np.asarray(got)[on], np.asarray(want)[on], atol=1e-5)
    assert np.all(np.asarray(got)[:, :p - 1] == 0)


def test_token_logprobs_gradient_matches_plain_forward(tiny):
    params, batch = tiny
    w = jnp.asarray(np.random.default_rng(3).normal(size=batch["tokens"].shape), jnp.float32)
    w = w * batch["loss_mask"]

    def chunked(p):
        logp, ent = objective.token_logprobs(p, batch, CFG, 0.8, 4, entropy_grad=True)
        return jnp.sum(w * logp) + jnp.sum(w * ent)

    def plain(p):
        logits = model.forward(p, batch["tokens"], CFG, batch["positions"], batch["segment_ids"])
        logq = jax.nn.log_softmax(logits / 0.8, axis=-1)
        targets = jnp.roll(batch["tokens"], -1, axis=1)
        logp = jnp.take_along_axis(logq, targets[..., None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
        return jnp.sum(w * logp) + jnp.sum(w * ent)

    g1, g2 = jax.jit(jax.grad(chunked))(params), jax.jit(jax.grad(plain))(params)
    for (path, a), b in zip(jax.tree.leaves_with_path(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_token_logprobs_bf16_close(tiny):
    params, batch = tiny
    cfg16 = dataclasses.replace(CFG, dtype="bfloat16")
    lp32, _ = _token_logprobs(params, batch, CFG, 0.7, 4)
    lp16, _ = _token_logprobs(params, batch, cfg16, 0.7, 4)
    assert lp16.dtype == jnp.float32
    on = batch["loss_mask"] > 0
    assert float(jnp.max(jnp.abs(lp16 - lp32) * on)) < 0.05


def test_fused_loss_equals_logprobs_then_loss(tiny):
    """fused_policy_loss: same value, stats and gradient (through the whole model) as the
    straightforward token_logprobs + policy_loss, for every aggregation, with KL and entropy."""
    params, batch = tiny
    rng = np.random.default_rng(4)
    shape = batch["tokens"].shape
    batch = dict(batch, old_logprobs=jnp.asarray(-rng.random(shape) * 4, jnp.float32),
                 ref_logprobs=jnp.asarray(-rng.random(shape) * 4, jnp.float32),
                 advantages=jnp.asarray(rng.normal(size=shape[0]), jnp.float32))
    kw = dict(clip_low=0.2, clip_high=0.28, max_len=9, kl_coef=0.1, entropy_coef=0.01)

    def plain(p, agg):
        logp, ent = objective.token_logprobs(p, batch, CFG, 0.9, 4, entropy_grad=True)
        return objective.policy_loss(logp, batch["old_logprobs"], batch["advantages"],
                                     batch["loss_mask"], ref_logp=batch["ref_logprobs"],
                                     entropy=ent, agg=agg, **kw)

    def fused(p, agg):
        h, _ = model.hidden_states(p, batch["tokens"], CFG, batch["positions"],
                                   batch["segment_ids"])
        return objective.fused_policy_loss(p, h, batch, CFG, 0.9, chunk=4, agg=agg, **kw)

    @jax.jit
    def both(p):
        out = {}
        for agg in objective.AGGREGATIONS:
            for name, fn in (("plain", plain), ("fused", fused)):
                grad, (count, stats) = jax.grad(lambda q: (lambda s, c, st: (s, (c, st)))(
                    *fn(q, agg)), has_aux=True)(p)
                out[agg, name] = grad, count, objective.finalize_stats(stats)
        return out

    out = both(params)
    for agg in objective.AGGREGATIONS:
        (g1, c1, m1), (g2, c2, m2) = out[agg, "plain"], out[agg, "fused"]
        assert c1 == c2
        for k in m1:
            np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=f"{agg} {k}")
        assert m1["clip_frac"] > 0 and m1["kl_ref"] > 0
        for (path, a), b in zip(jax.tree.leaves_with_path(g2), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7,
                                       err_msg=f"{agg} {jax.tree_util.keystr(path)}")


def test_fused_loss_in_bf16_is_close_to_the_unfused_path(tiny):
    """In bf16 the fused head takes the logits' cotangent in bf16 for its two backward matmuls;
    the gradient stays within bf16 rounding of the autodiff path (float32 params and grads)."""
    params, batch = tiny
    cfg = dataclasses.replace(CFG, dtype="bfloat16", tie_embeddings=True)
    params = {k: v for k, v in params.items() if k != "lm_head"}
    rng = np.random.default_rng(5)
    shape = batch["tokens"].shape
    batch = dict(batch, old_logprobs=jnp.asarray(-rng.random(shape) * 4, jnp.float32),
                 advantages=jnp.asarray(rng.normal(size=shape[0]), jnp.float32))

    def plain(p):
        logp, _ = objective.token_logprobs(p, batch, cfg, 0.9, 4)
        return objective.policy_loss(logp, batch["old_logprobs"], batch["advantages"],
                                     batch["loss_mask"])[0]

    def fused(p):
        h, _ = model.hidden_states(p, batch["tokens"], cfg, batch["positions"],
                                   batch["segment_ids"])
        return objective.fused_policy_loss(p, h, batch, cfg, 0.9, chunk=4)[0]

    g1, g2 = jax.jit(lambda p: (jax.grad(plain)(p), jax.grad(fused)(p)))(params)
    for (path, a), b in zip(jax.tree.leaves_with_path(g2), jax.tree.leaves(g1)):
        assert a.dtype == jnp.float32
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert rel < 0.03, (jax.tree_util.keystr(path), rel)
