"""Model: cached decoding (both cache layouts) equals the full forward; masks; numpy reference."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpt_jax import model
from rpt_jax.config import base_config

CFG = dataclasses.replace(model.ModelConfig.from_config(base_config("tiny").model),
                          dtype="float32", qkv_bias=True, tie_embeddings=False)


@pytest.fixture(scope="module")
def params():
    p = model.init(CFG, jax.random.key(0))
    # Non-trivial norms and biases so that a layout bug cannot hide behind ones and zeros.
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), p)


def test_init_shapes_match_logical_axes():
    shapes = model.param_shapes(CFG)
    axes = model.logical_axes(CFG)
    flat_s = jax.tree.leaves(shapes)
    flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_s) == len(flat_a)
    for s, a in zip(flat_s, flat_a):
        assert len(s.shape) == len(a)
    assert "lm_head" in shapes and "bias" in shapes["layers"]["q_proj"]


def _np_forward(params, tokens, cfg):
    """Independent numpy reference of the whole decoder (HF conventions)."""
    p = jax.tree.map(np.asarray, params)
    x = p["embed_tokens"][tokens].astype(np.float64)
    t = tokens.shape[1]
    e = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, e, 2) / e)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rot(v):  # v [b, t, n, e]
        half = np.concatenate([-v[..., e // 2:], v[..., :e // 2]], -1)
        return v * cos[None, :, None] + half * sin[None, :, None]

    def norm(v, w):
        return w * v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_norm_eps)

    L = p["layers"]
    rep = cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.num_layers):
        h = norm(x, L["input_layernorm"][i])
        q = np.einsum("btd,dhe->bthe", h, L["q_proj"]["kernel"][i]) + L["q_proj"]["bias"][i]
        k = np.einsum("btd,dhe->bthe", h, L["k_proj"]["kernel"][i]) + L["k_proj"]["bias"][i]
        v = np.einsum("btd,dhe->bthe", h, L["v_proj"]["kernel"][i]) + L["v_proj"]["bias"][i]
        q, k = rot(q), rot(k)
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
        s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(e)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhe->bqhe", a, v)
        x = x + np.einsum("bthe,hed->btd", o, L["o_proj"]["kernel"][i])
        h = norm(x, L["post_attention_layernorm"][i])
        g = np.einsum("btd,df->btf", h, L["gate_proj"]["kernel"][i])
        u = np.einsum("btd,df->btf", h, L["up_proj"]["kernel"][i])
        x = x + np.einsum("btf,fd->btd", g / (1 + np.exp(-g)) * u, L["down_proj"]["kernel"][i])
    return np.einsum("btd,dv->btv", norm(x, p["norm"]), p["lm_head"])


def test_forward_matches_numpy_reference(params):
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))
    got = model.forward(params, jnp.asarray(tokens), CFG)
    np.testing.assert_allclose(got, _np_forward(params, tokens, CFG), atol=2e-4, rtol=2e-4)


def _decode_cached(params, prompt, seg, pos, tokens, positions, layout):
    """Prefill all but the last token of `prompt` [b, t], then decode that token and tokens [b, n]
    one at a time; logits [b, 1 + n, v].

    layout "shared": the prompt cache is read next to the response cache; "copied": it is copied
    into the per-sample cache; "blocks": read-only prompt, then the response in two blocks (the
    first read-only once full).
    """
    b, n = tokens.shape
    prompt_cache = model.prefill_prompt(params, prompt[:, :-1], CFG, pos[:, :-1], seg[:, :-1],
                                        "float32")
    tokens = jnp.concatenate([prompt[:, -1:], tokens], axis=1)
    positions = jnp.concatenate([pos[:, -1:], positions], axis=1)
    weights = model.decoding_weights(params, CFG)
    half = (n + 2) // 2
    if layout == "copied":
        frozen, offset = [], prompt.shape[1] - 1
        blocks = [model.init_response_cache(CFG, b, offset + n + 1, "float32", prompt_cache)]
    else:
        frozen, offset = [prompt_cache], 0
        sizes = [half, n + 1 - half] if layout == "blocks" else [n + 1]
        blocks = [model.init_response_cache(CFG, b, size, "float32") for size in sizes]
    step = jax.jit(model.decode_step, static_argnums=6)
    out = []
    for i in range(n + 1):
        if len(blocks) == 2 and i == half:  # first block full: read-only from now on
            frozen, blocks, offset = frozen + blocks[:1], blocks[1:], -half
        logits, blocks[0] = step(weights, tokens[:, i], positions[:, i], frozen, blocks[0],
                                 jnp.asarray(offset + i, jnp.int32), CFG)
        out.append(logits)
    return jnp.stack(out, axis=1)


LAYOUTS = ["shared", "copied", "blocks"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_decoding_reproduces_full_forward(params, layout):
    rng = np.random.default_rng(1)
    b, t, n_new = 3, 10, 6
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t + n_new)), jnp.int32)
    full = model.forward(params, tokens, CFG)
    pos = jnp.broadcast_to(jnp.arange(t + n_new, dtype=jnp.int32), (b, t + n_new))
    got = _decode_cached(params, tokens[:, :t], jnp.ones((b, t), jnp.int32), pos[:, :t],
                         tokens[:, t:], pos[:, t:], layout)
    np.testing.assert_allclose(got, full[:, t - 1:], atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_left_padding_with_positions_and_segments(params, layout):
    """A left-padded row, with positions counted from its first real token, equals the unpadded row."""
    rng = np.random.default_rng(2)
    row = jnp.asarray(rng.integers(1, CFG.vocab_size, (1, 7)), jnp.int32)
    pad = 3
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), row], axis=1)
    seg = jnp.asarray([[0] * pad + [1] * 7], jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    ref = model.forward(params, row, CFG)
    got = model.forward(params, padded, CFG, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(got[:, pad:], ref, atol=1e-5)
    # and through the cache: decode one more token after a padded prefill
    nxt = jnp.asarray([[5]], jnp.int32)
    ref2 = model.forward(params, jnp.concatenate([row, nxt], 1), CFG)[:, -2:]
    got2 = _decode_cached(params, padded, seg, pos, nxt, jnp.asarray([[7]], jnp.int32), layout)
    np.testing.assert_allclose(got2, ref2, atol=1e-5)


def test_rows_read_a_shared_prompt_up_to_their_own_limit(params):
    """One prompt row read by 3 rows, each up to its own slot limit (a document's contexts):
    row i continues doc[:visible[i]] with its own token and equals the full forward of that."""
    rng = np.random.default_rng(6)
    doc = jnp.asarray(rng.integers(1, CFG.vocab_size, (1, 10)), jnp.int32)
    visible = np.array([4, 7, 10], np.int32)
    nxt = jnp.asarray(rng.integers(1, CFG.vocab_size, 3), jnp.int32)
    seg = jnp.ones((1, 10), jnp.int32)
    prompt_cache = model.prefill_prompt(params, doc, CFG, jnp.arange(10)[None], seg, "float32")
    prompt_cache["visible"] = jnp.asarray(visible)[None]  # [1 row, 3 readers]
    cache = model.init_response_cache(CFG, 3, 2, "float32")
    logits, _ = model.decode_step(model.decoding_weights(params, CFG), nxt,
                                  jnp.asarray(visible), [prompt_cache], cache, 0, CFG)
    for i, n in enumerate(visible):
        seq = jnp.concatenate([doc[:, :n], nxt[None, i:i + 1]], axis=1)
        np.testing.assert_allclose(logits[i], model.forward(params, seq, CFG)[0, -1], atol=1e-5)


def test_decode_step_down_projection_split_over_mlp_dim(params):
    """split_down=4: the same logits (float32 sums in another order); 5 does not divide 384."""
    weights = model.decoding_weights(params, CFG)
    cache = model.init_response_cache(CFG, 2, 16, "float32")
    tokens, positions = jnp.asarray([3, 9], jnp.int32), jnp.asarray([0, 0], jnp.int32)
    want, _ = model.decode_step(weights, tokens, positions, [], cache, 0, CFG)
    got, _ = model.decode_step(weights, tokens, positions, [], cache, 0, CFG, split_down=4)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="split_down=5 does not divide mlp_dim=384"):
        model.decode_step(weights, tokens, positions, [], cache, 0, CFG, split_down=5)


def test_segments_do_not_attend_across(params):
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 5)), jnp.int32)
    b = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 4)), jnp.int32)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.asarray([[1] * 5 + [2] * 4])
    pos = jnp.asarray([list(range(5)) + list(range(4))])
    got = model.forward(params, packed, CFG, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(got[:, 5:], model.forward(params, b, CFG), atol=1e-5)


def test_no_attention_row_is_empty(params, monkeypatch):
    """Padding tokens attend to themselves alone: an attention that gives NaN for a query row
    allowing nothing (as a fused kernel may) cannot reach the real tokens through the padding
    slots' keys and values. Real rows are as before."""
    seg = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 2, 2, 2, 0]])
    mask = np.asarray(model.causal_mask(seg))
    assert mask.any(-1).all()
    s = np.asarray(seg)
    for b in range(2):
        for i in range(6):
            want = [j <= i and s[b, j] == s[b, i] != 0 for j in range(6)] if s[b, i] else \
                [j == i for j in range(6)]
            assert mask[b, i].tolist() == want
    real = model._attend
    monkeypatch.setattr(model, "_attend", lambda q, k, v, allowed: jnp.where(
        allowed.any(-1)[:, :, None, None], real(q, k, v, allowed), jnp.nan))
    tokens = jnp.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 0]])
    hidden, _ = model.hidden_states(params, tokens, CFG, segment_ids=seg)
    assert np.isfinite(np.asarray(hidden)).all()


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_gradients(params, remat):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
    cfg_r = dataclasses.replace(CFG, remat=remat)

    def loss(p, cfg):
        return jax.nn.log_softmax(model.forward(p, tokens, cfg)).mean()

    g0 = jax.grad(loss)(params, CFG)
    g1 = jax.grad(loss)(params, cfg_r)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_bf16_compute_close_to_f32(params):
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
    cfg16 = dataclasses.replace(CFG, dtype="bfloat16")
    a = model.forward(params, tokens, CFG)
    b = model.forward(params, tokens, cfg16)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.15)  # bf16 keeps ~3 significant digits


def test_shared_prompt_hidden_states_equal_the_full_forward(params):
    """Rows in groups of g sharing their (left-padded) prompt columns: each prompt computed once
    gives the hidden states of every row computed whole, at every real token from the last
    prompt column on."""
    rng = np.random.default_rng(7)
    b, g, p, r = 3, 4, 7, 5
    prompt = rng.integers(1, CFG.vocab_size, (b, p))
    pmask = np.ones((b, p), np.int32)
    pmask[0, :3] = pmask[2, :1] = 0
    lengths = rng.integers(1, r + 1, b * g)
    seg = np.concatenate([np.repeat(pmask, g, 0),
                          (np.arange(r)[None] < lengths[:, None]).astype(np.int32)], 1)
    tokens = np.concatenate([np.repeat(prompt, g, 0),
                             rng.integers(1, CFG.vocab_size, (b * g, r))], 1) * seg
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
    args = [jnp.asarray(x, jnp.int32) for x in (tokens, pos, seg)]
    want, _ = model.hidden_states(params, args[0], CFG, *args[1:])
    got = model.hidden_states_shared_prompt(params, args[0], CFG, *args[1:], g, p)
    assert got.shape == (b * g, r + 1, CFG.hidden_size)  # from the last prompt column on
    real = seg[:, p - 1:].astype(bool)
    # hidden states reach ~25 here: float32 sums in another order differ by ~1e-6 of that
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[:, p - 1:][real],
                               rtol=1e-5, atol=5e-5)
    with pytest.raises(ValueError, match="groups of g=5"):
        model.hidden_states_shared_prompt(params, args[0], CFG, *args[1:], 5, p)


def test_shared_prompt_attention_fused_branch_equals_einsums():
    """The branch model.attention="cudnn" takes (prompt keys copied per row, one fused call),
    run with jax's "xla" implementation here, equals the einsum branch."""
    rng = np.random.default_rng(8)
    b, g, t, p, kv, h, e = 2, 3, 5, 4, 2, 4, 8
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    args = (normal(b * g, t, h, e), normal(b * g, t, kv, e), normal(b * g, t, kv, e),
            normal(b, p, kv, e), normal(b, p, kv, e), jnp.asarray(rng.random((b * g, t, p)) < .8),
            jnp.asarray(np.broadcast_to(np.tril(np.ones((t, t), bool)), (b * g, t, t))), g)
    np.testing.assert_allclose(model._attend_after_prompt(*args, fused="xla"),
                               model._attend_after_prompt(*args), atol=1e-5)
