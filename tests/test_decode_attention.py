"""The fused decode-attention kernel (Pallas, run by its interpreter on CPU) against numpy, and
the sampler with attention="pallas" against attention="xla"."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpt_jax import decode_attention, model, sampling
from test_sampling import (CFG, SAMPLED, _jit_sample, grouped, on_mesh,  # noqa: F401
                           params)  # (fixtures)


def _reference(q, keys, values, ok):
    """numpy: softmax over the slots each query row sees (ok [b, h, s]) @ values, and the log
    of the softmax denominator (-inf where a row sees nothing)."""
    scores = np.einsum("bkhe,bkse->bkhs", q, keys) / np.sqrt(q.shape[-1])
    ok = ok[:, None]
    top = np.where(ok, scores, -np.inf).max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.where(ok, np.exp(scores - top), 0.0)
    total = p.sum(-1)
    out = np.einsum("bkhs,bkse->bkhe", p, values) / np.where(total > 0, total, 1)[..., None]
    lse = np.where(total > 0, np.log(np.where(total > 0, total, 1)) + top[..., 0], -np.inf)
    return out, lse


def _sees(valid, limit):
    """[b, h, s]: slot held a token and lies below the query row's limit."""
    return valid[:, None, :] & (np.arange(valid.shape[1]) < limit[:, :, None])


def _random_part(rng, b, k, h, s, e):
    q, keys, values = (rng.standard_normal(shape).astype(np.float32)
                       for shape in ((b, k, h, e), (b, k, s, e), (b, k, s, e)))
    valid = rng.random((b, s)) < 0.7
    limit = rng.integers(0, s + 1, (b, h)).astype(np.int32)
    return q, keys, values, valid, limit


@pytest.mark.parametrize("splits", [1, 3])
def test_part_attention_against_numpy(splits):
    """Several blocks of slots, holes in valid, per-query-row limits (one row sees nothing, one
    only the first range), in one slot range or three run apart and combined."""
    rng = np.random.default_rng(0)
    q, keys, values, valid, limit = _random_part(rng, 3, 2, 5, 48, 8)
    limit[0, 0] = 0
    limit[0, 1] = 7
    limit[1, 2] = 48
    out, lse = decode_attention.part_attention(*map(jnp.asarray, (q, keys, values, valid, limit)),
                                               block_k=16, splits=splits)
    want_out, want_lse = _reference(q, keys, values, _sees(valid, limit))
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    seen = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[seen], want_lse[seen], atol=1e-5)
    if splits > 1:
        return
    with pytest.MonkeyPatch.context() as mp:  # a jax whose Pallas has no Triton backend
        mp.setattr(decode_attention, "plgpu", None)
        with pytest.raises(ValueError, match="needs Pallas' Triton backend, which jax"):
            decode_attention.part_attention(*map(jnp.asarray, (q, keys, values, valid, limit)),
                                            block_k=16)
    with pytest.raises(ValueError, match="cache of 40 slots"):
        decode_attention.part_attention(*map(jnp.asarray, (q, keys[:, :, :40], values[:, :, :40],
                                                           valid[:, :40], limit)))
    with pytest.raises(ValueError, match="does not split into 2 ranges"):
        decode_attention.part_attention(*map(jnp.asarray, (q, keys, values, valid, limit)),
                                        block_k=16, splits=2)
    # few programs, long cache: the automatic choice splits it
    assert decode_attention.splits_for(8, 8192, 64) == 64
    assert decode_attention.splits_for(1024, 8192, 64) == 1
    # many query rows (a document row read by several contexts x samples x heads): 40 rows
    # padded to 64, in blocks of 16 rows
    q, keys, values, valid, limit = _random_part(rng, 2, 2, 40, 32, 8)
    out, lse = decode_attention.part_attention(*map(jnp.asarray, (q, keys, values, valid, limit)),
                                               block_k=16, block_h=16)
    want_out, want_lse = _reference(q, keys, values, _sees(valid, limit))
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(np.where(np.isfinite(want_lse), lse, 0),
                               np.where(np.isfinite(want_lse), want_lse, 0), atol=1e-5)


def test_merged_parts_equal_one_softmax_over_both():
    """Two parts (limited prompt rows, a fully visible block) merged by their log-sum-exp equal
    one softmax over the concatenated slots."""
    rng = np.random.default_rng(1)
    q, k1, v1, valid1, limit1 = _random_part(rng, 2, 2, 3, 32, 8)
    _, k2, v2, valid2, _ = _random_part(rng, 2, 2, 3, 16, 8)
    valid2[:, 0] = True  # every row sees at least one slot
    limit2 = np.full_like(limit1, 16)
    merged = decode_attention.merge([
        decode_attention.part_attention(*map(jnp.asarray, (q, k, v, valid, limit)))
        for k, v, valid, limit in ((k1, v1, valid1, limit1), (k2, v2, valid2, limit2))])
    ok = np.concatenate([_sees(valid1, limit1), _sees(valid2, limit2)], axis=-1)
    want, _ = _reference(q, np.concatenate([k1, k2], 2), np.concatenate([v1, v2], 2), ok)
    np.testing.assert_allclose(merged, want, atol=1e-5)


def _rope_np(x, positions, theta=10_000.0):
    """numpy rotate-half rope of x [b, ..., e] at positions [b]."""
    e = x.shape[-1]
    angles = positions[:, None] * theta ** (-np.arange(0, e, 2) / e)  # [b, e/2]
    shape = (len(positions),) + (1,) * (x.ndim - 2) + (e // 2,)
    cos, sin = np.cos(angles).reshape(shape), np.sin(angles).reshape(shape)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1), angles


@pytest.mark.parametrize("splits", [1, 2])
def test_step_attention_against_numpy(splits):
    """The fused step: rope of the queries and the new key, the new key and value written to
    their slot (the rest of the cache untouched), attention over the valid slots each row reads
    plus its new token; a row reading nothing from its cache sees its new token only. Alone,
    or returning the queries and the log-sum-exp for other parts' kernels."""
    rng = np.random.default_rng(11)
    b, kv, n, e, s = 3, 2, 3, 8, 32
    qkv = rng.standard_normal((b, kv, n + 2, e)).astype(np.float32)
    keys, values = (rng.standard_normal((b, kv, s, e)).astype(np.float32) for _ in range(2))
    valid = rng.random((b, s)) < 0.7
    positions = np.array([4.0, 9.0, 40.0])
    slot = np.array([5, 17, 30], np.int32)
    read = np.array([5, 0, 30], np.int32)
    q, angles = _rope_np(qkv[:, :, :n], positions)
    k_new = _rope_np(qkv[:, :, n], positions)[0]  # [b, kv, e]
    v_new = qkv[:, :, n + 1]
    args = list(map(jnp.asarray, (qkv, np.cos(angles), np.sin(angles), keys, values, valid,
                                  slot, read)))
    out, got_k, got_v = decode_attention.step_attention(*args, block_k=16, splits=splits)
    # with other parts to follow: (out, lse) for the merge, and the queries after rope
    parts_out, lse, got_q, *caches = decode_attention.step_attention(
        *args, alone=False, block_k=16, splits=splits)
    want_k, want_v = keys.copy(), values.copy()
    want_k[np.arange(b), :, slot] = k_new
    want_v[np.arange(b), :, slot] = v_new
    np.testing.assert_allclose(got_k, want_k, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_v), want_v)
    sees = np.concatenate([valid & (np.arange(s) < read[:, None]), np.ones((b, 1), bool)], 1)
    want, want_lse = _reference(q, np.concatenate([keys, k_new[:, :, None]], 2),
                                np.concatenate([values, v_new[:, :, None]], 2),
                                np.repeat(sees[:, None], n, axis=1))
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(parts_out, want, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    np.testing.assert_allclose(got_q, q, atol=1e-6)
    for got, wanted in zip(caches, (want_k, want_v)):
        np.testing.assert_allclose(got, wanted, atol=1e-6)


PALLAS = dataclasses.replace(SAMPLED, attention="pallas")


@pytest.mark.parametrize("change", [
    dict(), dict(cache_layout="per_sample"), dict(cache_blocks=3), dict(num_samples=1)])
def test_sampler_with_pallas_attention_equals_xla(params, change):  # noqa: F811
    """Same tokens as the einsum attention (float32 cache), logprobs within 1e-5: shared and
    per-sample layouts, the cache in blocks, G = 1; prompt lengths that are not multiples of 16."""
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, (4, 13)), jnp.int32)
    mask = jnp.asarray(np.arange(13)[None, :] >= np.array([[0], [5], [9], [12]]), jnp.int32)
    prompts = sampling.Prompts(tokens, mask)
    want = _jit_sample(params, prompts, jax.random.key(8), CFG,
                       dataclasses.replace(SAMPLED, **change), 0)
    got = _jit_sample(params, prompts, jax.random.key(8), CFG,
                      dataclasses.replace(PALLAS, **change), 0)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_grouped_prompts_with_pallas_attention_on_eight_devices(params, grouped):  # noqa: F811
    """Document rows read up to each context's limit, rows and kv heads split over a (2, 2, 2)
    mesh (the kernel runs per device under shard_map): the tokens of the einsum attention."""
    prompts, _, _ = grouped
    want = _jit_sample(params, prompts, jax.random.key(6), CFG, SAMPLED, 0)
    run, sharded_params, mesh = on_mesh(params, (2, 2, 2), PALLAS)
    got = run(sharded_params, prompts, jax.random.key(6))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    with jax.set_mesh(mesh):
        hlo = run.jitted.lower(sharded_params, prompts, jax.random.key(6)).as_text()
    assert "sdy.manual_computation" in hlo or "shard_map" in hlo  # not left to the partitioner


def _step_inputs(params, slots, seed, rows=4, written=5):  # noqa: F811
    """(decoding weights, a per-sample cache of `slots` slots with `written` random ones,
    tokens, positions, written) for one decode step of `rows` rows."""
    rng = np.random.default_rng(seed)
    cache = model.init_response_cache(CFG, rows, slots, "float32")
    filled = lambda x: x.at[:, :, :written].set(  # noqa: E731
        jnp.asarray(rng.standard_normal(x[:, :, :written].shape), x.dtype))
    cache = {"k": tuple(map(filled, cache["k"])), "v": tuple(map(filled, cache["v"])),
             "valid": cache["valid"].at[:, :written].set(True)}
    tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, rows), jnp.int32)
    return (model.decoding_weights(params, CFG), cache, tokens,
            jnp.full((rows,), written, jnp.int32), written)


def test_decode_step_reads_only_the_blocks_written_so_far(params):  # noqa: F811
    """NaN keys and values in the slots a step has not reached (past the first 16-slot block)
    would poison any kernel that reads them; the pallas step's logits equal the einsum step's
    on a clean cache."""
    weights, cache, tokens, positions, written = _step_inputs(params, 48, seed=3)
    poisoned = dict(cache, **{kv: tuple(x.at[:, :, 16:].set(jnp.nan) for x in cache[kv])
                              for kv in ("k", "v")})
    want, _ = model.decode_step(weights, tokens, positions, [], cache, written, CFG)
    got, _ = model.decode_step(weights, tokens, positions, [], poisoned, written, CFG, "pallas")
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("preset,g", [("qwen2_5_0_5b", 1), ("qwen2_5_0_5b", 64),
                                      ("r1_distill_qwen_14b", 8)])
def test_kernel_lowers_to_triton_for_gpus(preset, g):
    """What the Triton lowering checks (power-of-two loads, supported ops) at real head shapes,
    on this CPU-only machine: lowered for CUDA, the kernel is one Triton custom call.
    g = 64: a document row read by 8 contexts x 8 samples (448 query rows, in blocks)."""
    from rpt_jax.config import MODEL_SHAPES
    shape = MODEL_SHAPES[preset]
    kv, e = shape["num_kv_heads"], shape["head_dim"]
    h = g * shape["num_heads"] // kv
    b, s = 8, 384
    args = [jax.ShapeDtypeStruct(x, t) for x, t in (((b, kv, h, e), jnp.bfloat16),
                                                    ((b, kv, s, e), jnp.bfloat16),
                                                    ((b, kv, s, e), jnp.bfloat16),
                                                    ((b, s), jnp.bool_), ((b, h), jnp.int32))]
    lowered = jax.jit(decode_attention.part_attention).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("preset", ["qwen2_5_0_5b", "r1_distill_qwen_14b"])
@pytest.mark.parametrize("alone", [True, False])
def test_step_kernel_lowers_to_triton_for_gpus(preset, alone):
    """The fused step's Triton lowering at real head shapes (masked 16-row loads of n + 2 rows,
    half-width dots, the aliased slot store), alone and with other parts to follow."""
    from rpt_jax.config import MODEL_SHAPES
    shape = MODEL_SHAPES[preset]
    kv, e = shape["num_kv_heads"], shape["head_dim"]
    n = shape["num_heads"] // kv
    b, s = 8, 384
    args = [jax.ShapeDtypeStruct(x, t) for x, t in (
        ((b, kv, n + 2, e), jnp.bfloat16), ((b, e // 2), jnp.float32),
        ((b, e // 2), jnp.float32), ((b, kv, s, e), jnp.bfloat16), ((b, kv, s, e), jnp.bfloat16),
        ((b, s), jnp.bool_), ((b,), jnp.int32), ((b,), jnp.int32))]
    fn = functools.partial(decode_attention.step_attention, alone=alone)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_rows_not_active_read_nothing(params):  # noqa: F811
    """A step's finished rows (active False) skip their caches: their logits do not depend on
    what their caches hold, and the active rows equal the einsum step's."""
    weights, cache, tokens, positions, written = _step_inputs(params, 64, seed=4)
    active = np.array([True, False, True, False])
    want, _ = model.decode_step(weights, tokens, positions, [], cache, written, CFG)
    got = []
    for fill in (3.0, -3.0):  # the finished rows' values: read, they would change the logits
        other = dict(cache, v=tuple(x.at[~active].set(fill) for x in cache["v"]))
        got.append(model.decode_step(weights, tokens, positions, [], other, written, CFG,
                                     "pallas", jnp.asarray(active))[0])
    np.testing.assert_array_equal(got[0][~active], got[1][~active])
    np.testing.assert_allclose(got[0][active], want[active], atol=1e-5)


@pytest.mark.parametrize("layout", ["shared", "per_sample"])
def test_stopped_rows_with_pallas_attention(params, layout):  # noqa: F811
    """Rows stop at different steps (half the vocabulary stops), so later steps skip the
    finished rows' caches (and, shared, some readers of a prompt row): outputs equal xla's."""
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, (4, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [3], [6], [8]]), jnp.int32)
    cfg = dataclasses.replace(SAMPLED, cache_layout=layout, max_new_tokens=12,
                              stop_ids=tuple(range(0, CFG.vocab_size, 9)))
    want = _jit_sample(params, sampling.Prompts(tokens, mask), jax.random.key(9), CFG, cfg, 0)
    got = _jit_sample(params, sampling.Prompts(tokens, mask), jax.random.key(9), CFG,
                      dataclasses.replace(cfg, attention="pallas"), 0)
    lengths = np.asarray(want.lengths)
    assert lengths.min() < lengths.max() and want.finished.any()  # rows finish apart
    for field in ("tokens", "lengths", "finished"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_nan_in_a_read_slot_comes_out_as_nan():
    """The kernel must not hide a broken cache: a NaN key in a slot a row reads gives NaN."""
    rng = np.random.default_rng(6)
    q, keys, values, valid, limit = _random_part(rng, 2, 1, 2, 16, 8)
    valid[:] = True
    limit[:] = 16
    keys[0, 0, 3] = np.nan
    out, lse = decode_attention.part_attention(*map(jnp.asarray, (q, keys, values, valid, limit)))
    assert np.isnan(out[0]).all() and np.isnan(lse[0]).all()
    assert np.isfinite(out[1]).all() and np.isfinite(lse[1]).all()


def test_sampler_lowers_with_triton_kernels_for_gpus(params):  # noqa: F811
    """The whole jitted sampler lowered for CUDA from this CPU machine: the pallas attention
    becomes Triton kernels (one per layer in the decode step), no interpreter left."""
    cfg = dataclasses.replace(PALLAS, cache_layout="per_sample", num_samples=1)
    prompts = sampling.Prompts(jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32))
    text = _jit_sample.trace(params, prompts, jax.random.key(0), CFG, cfg, 0).lower(
        lowering_platforms=("cuda",)).as_text()
    # plain prompts: a one-token tail, so no steps before the loop; one loop, one part
    assert text.count("__gpu$xla.gpu.triton") == CFG.num_layers
