"""Sampler: greedy == repeated argmax of the full forward, logprobs == full-forward rescoring,
sharding-independent randomness, stop handling, filtering distributions, memory check."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpt_jax import model, rope, sampling, sharding

CFG = model.ModelConfig(vocab_size=96, num_layers=2, hidden_size=32, num_heads=4,
                        num_kv_heads=2, head_dim=8, mlp_dim=64, rope_theta=10_000.0,
                        qkv_bias=True, tie_embeddings=False)
N = 7  # max_new_tokens
BASE = sampling.SamplingConfig(num_samples=2, temperature=0.7, max_new_tokens=N,
                               cache_dtype="float32")
GREEDY = dataclasses.replace(BASE, greedy=True)


@functools.cache
def _params(cfg):
    @jax.jit
    def make(rng):
        p = model.init(cfg, rng)
        # larger weights than init: peaked distributions, so greedy argmax ties are implausible
        return jax.tree.map(lambda x: 4 * x + 0.05 * jax.random.normal(rng, x.shape), p)
    return make(jax.random.key(0))


@pytest.fixture(scope="module")
def params():
    return _params(CFG)


def _left_pad(rows, width):
    """Left-padded prompts [b, width] (pad id 0) and mask."""
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return jnp.asarray(tokens), jnp.asarray(mask)


def _ragged_prompts(lengths, width, seed=0):
    """Left-padded prompts [b, width] and mask, plus the unpadded rows."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, CFG.vocab_size, n) for n in lengths]
    return (*_left_pad(rows, width), rows)


_jit_sample = jax.jit(sampling.sample, static_argnums=(3, 4, 5))


def _sample(params, tokens, mask, rng, cfg, sampling_cfg, pad_id):
    return _jit_sample(params, sampling.Prompts(tokens, mask), rng, cfg, sampling_cfg, pad_id)


WIDTH = 32  # the reference forward runs on one fixed length (causal: later tokens do not matter)
_forward = jax.jit(lambda params, seq, cfg: model.forward(params, seq, cfg)[0], static_argnums=2)


def _full_logits(params, seq, cfg=CFG):
    """Float32 logits [len(seq), v] of the unpadded sequence from the full forward."""
    padded = np.zeros((1, WIDTH), np.int32)
    padded[0, :len(seq)] = seq
    return np.asarray(_forward(params, jnp.asarray(padded), cfg))[:len(seq)]


def _rescore(params, prompt, response, temperature, cfg=CFG):
    """log_softmax(forward / T) of each response token given the unpadded prompt: [len]."""
    logits = _full_logits(params, np.concatenate([prompt, response]), cfg)[len(prompt) - 1:-1]
    logp = jax.nn.log_softmax(jnp.asarray(logits) / temperature, axis=-1)
    return np.asarray(jnp.take_along_axis(logp, jnp.asarray(response)[:, None], -1)[:, 0])


@pytest.fixture(scope="module")
def ragged():
    return _ragged_prompts([9, 4, 1, 12], width=12)


SAMPLED = dataclasses.replace(BASE, num_samples=3, cache_layout="shared", prefill_chunks=2)


@pytest.fixture(scope="module")
def sampled(params, ragged):
    tokens, mask, _ = ragged
    return _sample(params, tokens, mask, jax.random.key(4), CFG, SAMPLED, 0)


@pytest.fixture(scope="module")
def greedy_out(params, ragged):
    tokens, mask, _ = ragged
    return _sample(params, tokens, mask, jax.random.key(3), CFG, GREEDY, 0)


def _check_greedy(params, rows, out, g, cfg=CFG):
    """out's rows (G = g of each prompt) equal each prompt decoded alone by the full forward."""
    for i, prompt in enumerate(rows):
        seq = list(prompt)
        for _ in range(N):
            seq.append(int(np.argmax(_full_logits(params, seq, cfg)[-1])))
        want = np.asarray(seq[len(prompt):])
        for j in range(g):
            np.testing.assert_array_equal(out.tokens[i * g + j], want)
            np.testing.assert_allclose(out.logprobs[i * g + j],
                                       _rescore(params, prompt, want, GREEDY.temperature, cfg),
                                       atol=1e-4)
    np.testing.assert_array_equal(out.lengths, N)
    assert not out.finished.any()


def test_greedy_equals_repeated_argmax_of_full_forward(params, ragged, greedy_out):
    """Every row (ragged, left padded, fanned out to G) equals its prompt decoded alone."""
    _check_greedy(params, ragged[2], greedy_out, GREEDY.num_samples)


# Architecture variants the decode step must follow: YaRN scales cos and sin (by 1.14) and
# changes the frequencies; Qwen3 normalises each query and key head before RoPE.
VARIANTS = {
    "yarn": dataclasses.replace(CFG, rope_scaling=rope.canonical(
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})),
    "qwen3": dataclasses.replace(CFG, qkv_bias=False, qk_norm=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("attention", ["xla", "pallas"])  # pallas: the fused step's own rope
def test_architecture_variants_greedy_equal_full_forward(ragged, greedy_out, variant, attention):
    tokens, mask, rows = ragged
    cfg, params = VARIANTS[variant], _params(VARIANTS[variant])
    out = _sample(params, tokens, mask, jax.random.key(3), cfg,
                  dataclasses.replace(GREEDY, num_samples=1, attention=attention), 0)
    _check_greedy(params, rows, out, 1, cfg)
    assert not np.allclose(out.logprobs, greedy_out.logprobs[::GREEDY.num_samples])


@pytest.mark.parametrize("change", [
    dict(num_samples=1), dict(cache_layout="shared"), dict(cache_blocks=3),
    dict(cache_blocks=3, cache_layout="shared"), dict(cache_blocks=9), dict(split_down=4)])
def test_cache_layouts_agree(params, ragged, greedy_out, change):
    """greedy_out used the per-sample layout (auto, short prompts) in one block; the shared
    layout, G=1, the cache in blocks (9: more blocks than the 7 fed tokens) and the down
    projection split over mlp_dim agree."""
    tokens, mask, _ = ragged
    cfg = dataclasses.replace(GREEDY, **change)
    out = _sample(params, tokens, mask, jax.random.key(3), CFG, cfg, 0)
    stride = GREEDY.num_samples // cfg.num_samples  # greedy samples of a context are equal
    np.testing.assert_array_equal(out.tokens, greedy_out.tokens[::stride])
    np.testing.assert_allclose(out.logprobs, greedy_out.logprobs[::stride], atol=1e-5)


def test_logprobs_equal_full_forward_rescoring(params, ragged, sampled):
    """Sampled tokens rescored by the full forward (f32): |diff| <= 1e-4 nats with a float32
    cache; with a bfloat16 cache (k, v rounded to 8 mantissa bits) median <= 1e-2 and
    max <= 0.25 nats on these deliberately peaked weights."""
    tokens, mask, rows = ragged
    bf16 = dataclasses.replace(SAMPLED, cache_dtype="bfloat16")
    for out, cache_dtype in ((sampled, "float32"),
                             (_sample(params, tokens, mask, jax.random.key(4), CFG, bf16, 0),
                              "bfloat16")):
        diffs = np.concatenate([
            np.abs(np.asarray(out.logprobs[r])
                   - _rescore(params, rows[r // 3], np.asarray(out.tokens[r]), BASE.temperature))
            for r in range(out.tokens.shape[0])])
        if cache_dtype == "float32":
            assert diffs.max() <= 1e-4, diffs.max()
        else:
            assert np.median(diffs) <= 1e-2 and diffs.max() <= 0.25, (np.median(diffs), diffs.max())
    # the 3 samples of a context are not copies of each other
    assert len({tuple(np.asarray(sampled.tokens[r])) for r in range(3)}) > 1


def on_mesh(params, shape, sampling_cfg):
    """(sampler jitted on a (data, fsdp, tensor) mesh of this shape, params placed there, mesh)."""
    mesh = jax.make_mesh(shape, sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shards = sharding.param_shardings(mesh, model.logical_axes(CFG))
    return (sampling.make_sampler(mesh, CFG, sampling_cfg, shards),
            jax.device_put(params, shards), mesh)


@pytest.mark.parametrize("shape, split_down", [((4, 1, 2), 1), ((2, 2, 2), 1), ((2, 2, 2), 4)])
def test_same_rng_same_tokens_on_one_and_eight_devices(params, ragged, sampled, shape,
                                                       split_down):
    """`sampled` ran on one device; the same rng on a (data, fsdp, tensor) mesh of 8 (also
    with the down projection's K, split over the tensor axis, in 4 slices)."""
    tokens, mask, _ = ragged
    assert len(jax.devices()) == 8 and len(sampled.tokens.devices()) == 1
    run, sharded_params, _ = on_mesh(params, shape,
                                     dataclasses.replace(SAMPLED, split_down=split_down))
    got = run(sharded_params, sampling.Prompts(tokens, mask), jax.random.key(4))
    assert got.tokens.sharding.spec[0] == sharding.BATCH and len(got.tokens.devices()) == 8
    np.testing.assert_array_equal(got.tokens, sampled.tokens)
    np.testing.assert_allclose(got.logprobs, sampled.logprobs, atol=1e-5)
    np.testing.assert_array_equal(got.lengths, sampled.lengths)


PREFIX, SUFFIX = [3, 5], [7, 11]  # template ids before and after the context


@pytest.fixture(scope="module")
def grouped():
    """4 documents x 2 contexts each as (grouped Prompts, the same prompts left padded, rows)."""
    rng = np.random.default_rng(5)
    docs = [rng.integers(1, CFG.vocab_size, n) for n in (9, 6, 12, 3)]
    positions = [(3, 9), (1, 5), (12, 7), (2, 3)]  # t: the context is doc[:t]
    width, m = 16, 2
    doc_tokens = np.zeros((4, width), np.int32)
    doc_mask = np.zeros((4, width), np.int32)
    visible, tail, rows = [], [], []
    for d, (doc, ts) in enumerate(zip(docs, positions)):
        row = PREFIX + list(doc[:max(ts) - 1])
        doc_tokens[d, :len(row)], doc_mask[d, :len(row)] = row, 1
        for t in ts:
            visible.append(len(PREFIX) + t - 1)
            tail.append([doc[t - 1]] + SUFFIX)
            rows.append(np.asarray(PREFIX + list(doc[:t]) + SUFFIX))
    tokens, mask = _left_pad(rows, 18)
    prompts = sampling.Prompts(jnp.asarray(doc_tokens), jnp.asarray(doc_mask),
                               jnp.asarray(visible, jnp.int32), jnp.asarray(tail, jnp.int32))
    assert prompts.check() == (4, width, 4 * m, 3)
    return prompts, sampling.Prompts(tokens, mask), rows


def test_document_grouped_prompts_sample_like_plain_prompts(params, grouped):
    """Each document prefilled once for both of its contexts: same tokens as the plain prompts
    with the same rng (float32 cache), logprobs within 1e-4 of the full-forward rescoring."""
    prompts, plain, rows = grouped
    want = _jit_sample(params, plain, jax.random.key(6), CFG, SAMPLED, 0)
    got = _jit_sample(params, prompts, jax.random.key(6), CFG, SAMPLED, 0)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    g = SAMPLED.num_samples
    for r in range(got.tokens.shape[0]):
        np.testing.assert_allclose(got.logprobs[r], _rescore(params, rows[r // g],
                                                             np.asarray(got.tokens[r]),
                                                             SAMPLED.temperature), atol=1e-4)
    # copied per sample instead of shared, and the cache in blocks (the 2 tail tokens fed
    # before sampling fill most of block 0): the same tokens
    for change in (dict(cache_layout="per_sample"), dict(cache_blocks=4)):
        again = _jit_sample(params, prompts, jax.random.key(6), CFG,
                            dataclasses.replace(SAMPLED, **change), 0)
        np.testing.assert_array_equal(again.tokens, want.tokens)


def test_document_grouped_prompts_on_eight_devices(params, grouped):
    prompts, _, _ = grouped
    want = _jit_sample(params, prompts, jax.random.key(6), CFG, SAMPLED, 0)
    run, sharded_params, _ = on_mesh(params, (2, 2, 2), SAMPLED)
    got = run(sharded_params, prompts, jax.random.key(6))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)  # other reduction order
    three = sampling.Prompts(prompts.tokens[:3], prompts.mask[:3], prompts.visible[:6],
                             prompts.tail[:6])
    with pytest.raises(ValueError, match="3 prompt rows are not divisible"):
        run(params, three, jax.random.key(6))
    with pytest.raises(ValueError, match="multiple of the 4 prefix rows"):
        run(params, prompts._replace(visible=prompts.visible[:6], tail=prompts.tail[:6]),
            jax.random.key(6))
    with pytest.raises(ValueError, match="need a `tail`"):
        prompts._replace(tail=None).check()
    with pytest.raises(ValueError, match=r"\(T >= 1\)"):
        prompts._replace(tail=prompts.tail[:, :0]).check()
    with pytest.raises(ValueError, match="cache_dtype='int8' is not"):
        dataclasses.replace(SAMPLED, cache_dtype="int8")


def test_stop_ids_lengths_finished_and_padding(params, ragged, greedy_out):
    """Stop on a token the greedy run produces at step 2 of row 0; compare with that run."""
    tokens, mask, _ = ragged
    ref = np.asarray(greedy_out.tokens)
    stop = int(ref[0, 2])
    assert stop not in ref[0, :2]
    cfg = dataclasses.replace(GREEDY, stop_ids=(stop, CFG.vocab_size + 5))  # one id never seen
    out = _sample(params, tokens, mask, jax.random.key(3), CFG, cfg, 77)
    for r in range(ref.shape[0]):
        hits = np.flatnonzero(ref[r] == stop)
        length = hits[0] + 1 if len(hits) else N
        assert out.lengths[r] == length and bool(out.finished[r]) == bool(len(hits))
        np.testing.assert_array_equal(out.tokens[r, :length], ref[r, :length])
        np.testing.assert_array_equal(out.tokens[r, length:], 77)
        np.testing.assert_array_equal(out.logprobs[r, length:], 0.0)
        np.testing.assert_allclose(out.logprobs[r, :length], greedy_out.logprobs[r, :length],
                                   atol=1e-6)
    assert out.lengths[0] == 3 and out.finished[0]
    # every token a stop id: all rows stop after one token and the loop exits at once
    every = dataclasses.replace(BASE, stop_ids=tuple(range(CFG.vocab_size)))
    out = _sample(params, tokens, mask, jax.random.key(3), CFG, every, 0)
    np.testing.assert_array_equal(out.lengths, 1)
    assert out.finished.all() and (out.tokens[:, 1:] == 0).all()


@pytest.mark.parametrize("change", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_equal_greedy(params, ragged, greedy_out, change):
    tokens, mask, _ = ragged
    cfg = dataclasses.replace(BASE, temperature=GREEDY.temperature, **change)
    out = _sample(params, tokens, mask, jax.random.key(8), CFG, cfg, 0)
    np.testing.assert_array_equal(out.tokens, greedy_out.tokens)
    np.testing.assert_allclose(out.logprobs, greedy_out.logprobs, atol=1e-6)


def _expected_probs(logits, temperature, top_k, top_p):
    """numpy reference of temperature, then top-k, then nucleus filtering."""
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.ones_like(z, bool)
    if top_k:
        keep[order[top_k:]] = False
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        mass = 0.0
        for i in order:  # keep the most likely tokens until their mass reaches top_p
            if mass >= top_p:
                keep[i] = False
            mass += p[i]
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


LOGITS_8 = np.array([2.0, 1.5, 1.0, 0.7, 0.2, -0.5, -1.0, -3.0], np.float32)
LOGITS_40 = np.random.default_rng(7).normal(0, 1.5, 40).astype(np.float32)  # chunks of 5


@pytest.mark.parametrize("logits,top_k,top_p", [
    (LOGITS_8, 0, 1.0), (LOGITS_8, 3, 1.0), (LOGITS_8, 0, 0.6), (LOGITS_8, 4, 0.7),
    (LOGITS_40, 0, 1.0), (LOGITS_40, 6, 1.0)])
def test_sampling_distribution(logits, top_k, top_p):
    """Frequencies of 20k draws of choose_tokens match the filtered softmax (5 sigma)."""
    rows, v = 20_000, len(logits)
    cfg = dataclasses.replace(BASE, temperature=0.8, top_k=top_k, top_p=top_p)
    toks, logp = jax.jit(sampling.choose_tokens, static_argnums=4)(
        jnp.broadcast_to(logits, (rows, v)), jax.random.key(9), 0, jnp.arange(rows), cfg)
    want = _expected_probs(logits.astype(np.float64), 0.8, top_k, top_p)
    freq = np.bincount(np.asarray(toks), minlength=v) / rows
    sigma = np.sqrt(want * (1 - want) / rows) + 1e-12
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-9), (freq, want)
    full = np.log(_expected_probs(logits.astype(np.float64), 0.8, 0, 1.0))
    np.testing.assert_allclose(logp, full[np.asarray(toks)], atol=1e-5)


def test_inverse_cdf_against_searchsorted():
    """Two-level inverse CDF == numpy searchsorted on the flat CDF; zero weights never chosen,
    even for u at the top of [0, 1) where float rounding puts u * total past the last sum."""
    rng = np.random.default_rng(3)
    w = rng.random((6, 40)).astype(np.float32)
    w[:, 10:20] = 0.0  # two whole chunks without mass
    w[:, 35:] = 0.0  # and the tail
    w[0, :] = 0.0
    w[0, 12] = 1.0  # a single token in an otherwise empty chunk
    u = np.array([0.0, 0.3, 0.5, 0.77, 0.999, np.nextafter(np.float32(1), np.float32(0))],
                 np.float32)
    weights = jnp.asarray(w)

    def weights_fn(j):
        return jnp.take_along_axis(weights.reshape(6, 8, 5), j[:, None, None], 1)[:, 0]

    toks, total = sampling._inverse_cdf(weights.reshape(6, 8, 5).sum(-1), weights_fn,
                                        jnp.asarray(u))
    toks = np.asarray(toks)
    for r in range(6):
        cdf = np.cumsum(w[r].astype(np.float64))
        assert w[r, toks[r]] > 0
        want = min(np.searchsorted(cdf / cdf[-1], u[r], side="right"), np.flatnonzero(w[r])[-1])
        assert toks[r] == want, (r, toks[r], want)
    np.testing.assert_allclose(total, w.sum(1), rtol=1e-6)


@pytest.mark.parametrize("stats", [sampling._stats_one_pass, sampling._stats_two_pass])
def test_softmax_stats_against_numpy(stats):
    """Both ways to the row max and the chunk sums of exp(x - max) match float64 numpy, with
    chunks of -inf (filtered tokens) weighing 0 and a NaN spoiling only its own row."""
    x = np.random.default_rng(5).normal(0, 4, (4, 8, 16)).astype(np.float32)
    x[1, 2] = -np.inf  # a whole chunk filtered out
    x[2, :, 3:] = -np.inf  # all but a few tokens of every chunk
    x[3, 5, 7] = np.nan
    top, mass = jax.jit(stats, static_argnums=1)(jnp.asarray(x.reshape(4, -1)), 16)
    x64 = x.astype(np.float64)
    want_top = x64[:3].max(axis=(1, 2))
    np.testing.assert_allclose(top[:3], want_top, rtol=1e-6)
    np.testing.assert_allclose(mass[:3], np.exp(x64[:3] - want_top[:, None, None]).sum(-1),
                               rtol=1e-5, atol=1e-30)
    assert np.all(np.asarray(mass[1, 2]) == 0)
    assert np.all(np.isnan(np.asarray(mass[3])))


def test_softmax_stats_one_pass_on_gpus_only():
    """The GPU lowering takes the single variadic reduction; CPU and TPU keep two plain ones."""
    fn = jax.jit(lambda x: sampling._softmax_stats(x, 16))
    arg = jax.ShapeDtypeStruct((4, 128), jnp.float32)
    for platform, variadic in (("cuda", 1), ("rocm", 1), ("cpu", 0), ("tpu", 0)):
        text = jax.export.export(fn, platforms=[platform])(arg).mlir_module()
        reduces = [line for line in text.splitlines() if "stablehlo.reduce(" in line]
        pairs = [line for line in reduces if re.search(r"init: %\S+\), \(%\S+ init:", line)]
        assert len(pairs) == variadic, (platform, reduces)


def test_rng_determinism(params, ragged, sampled):
    tokens, mask, _ = ragged
    again = _sample(params, tokens, mask, jax.random.key(4), CFG, SAMPLED, 0)
    other = _sample(params, tokens, mask, jax.random.key(12), CFG, SAMPLED, 0)
    np.testing.assert_array_equal(again.tokens, sampled.tokens)
    assert (np.asarray(other.tokens) != np.asarray(sampled.tokens)).any()


def test_check_memory():
    big = model.ModelConfig(vocab_size=151936, num_layers=24, hidden_size=896, num_heads=14,
                            num_kv_heads=2, head_dim=64, mlp_dim=4864, dtype="bfloat16")
    cfg = sampling.SamplingConfig(num_samples=8, max_new_tokens=8192)
    with pytest.raises(ValueError, match=r"max_new_tokens=8192 needs about .* GiB"):
        sampling.check_memory(big, cfg, batch=256, prompt_len=4096, bytes_available=80 * 2**30)
    # 32 contexts x 8 do not fit in 20 GiB all at once; the suggested lanes do, and 8 more not
    with pytest.raises(ValueError, match=r"sampling.lanes=(\d+) \(continuous") as err:
        sampling.check_memory(big, cfg, batch=32, prompt_len=1024, bytes_available=20 * 2**30)
    lanes = int(re.search(r"sampling.lanes=(\d+)", str(err.value)).group(1))
    assert 0 < lanes < 256 and lanes % 8 == 0
    fits = dataclasses.replace(cfg, lanes=lanes)
    sampling.check_memory(big, fits, batch=32, prompt_len=1024, bytes_available=20 * 2**30)
    with pytest.raises(ValueError):
        sampling.check_memory(big, dataclasses.replace(fits, lanes=lanes + 8), batch=32,
                              prompt_len=1024, bytes_available=20 * 2**30)
    # on data x fsdp = 4 devices the lanes come in slots of 8 on each: multiples of 32
    with pytest.raises(ValueError, match=r"sampling.lanes=(\d+) \(continuous") as err:
        sampling.check_memory(big, cfg, batch=32, prompt_len=1024, bytes_available=20 * 2**30,
                              fsdp=2, data=2)
    assert int(re.search(r"sampling.lanes=(\d+)", str(err.value)).group(1)) % 32 == 0
    need = sampling.check_memory(big, cfg, batch=1, prompt_len=256, bytes_available=80 * 2**30)
    # what fits alone does not beside optimizer state that leaves less than it needs
    with pytest.raises(ValueError, match=r"GiB are available \(80.00 GiB less 79.00 GiB of "
                                         r"optimizer state\)"):
        sampling.check_memory(big, cfg, batch=1, prompt_len=256, bytes_available=80 * 2**30,
                              reserved_bytes=79 * 2**30)
    # params f32 (494M x 4) + bf16 copy (x 2) + response cache (8 x 8192 x 24 x 2 x 2 x 64 x 2)
    assert need > 494e6 * 6 + 8 * 8192 * 24 * 2 * 2 * 64 * 2
    # prefilling 256 prompts of 4096 tokens in 16 slices removes most of the activations
    short = dataclasses.replace(cfg, max_new_tokens=256)
    whole = sampling.memory_bytes(big, short, 256, 4096)["prefill activations"]
    sliced = sampling.memory_bytes(big, dataclasses.replace(short, prefill_chunks=16), 256,
                                   4096)["prefill activations"]
    assert sliced * 16 == whole
    # decoding weights gathered over fsdp=4: four bf16 copies instead of one
    split = sampling.memory_bytes(big, short, 256, 4096, fsdp=4)
    one = sampling.memory_bytes(big, dataclasses.replace(short, gather_weights=False), 256, 4096,
                                fsdp=4)
    key = "decoding weights (compute-dtype copy)"
    assert split[key] == 4 * one[key] == 4 * model.num_params(big) * 2
    # 2 data-parallel replicas: the weights twice, the caches and buffers split between them
    both = sampling.memory_bytes(big, short, 256, 4096, fsdp=4, data=2)
    assert both["params"] == 2 * split["params"] and both[key] == 2 * split[key]
    assert all(both[k] == split[k] for k in split if k not in ("params", key))
    # 256 contexts from 32 documents of 4096 tokens: one prompt cache per document, and the
    # per-sample caches hold only the 4-token tail and the response (shared layout)
    per_slot = 24 * 2 * 2 * 64 * 2
    plain = sampling.memory_bytes(big, short, 256, 4096)
    grouped = sampling.memory_bytes(big, short, 256, 4096, prefix_rows=32, tail_len=4)
    assert plain["prompt KV cache"] == 8 * grouped["prompt KV cache"] == 256 * 4096 * per_slot
    assert grouped["per-sample KV cache"] == 256 * 8 * (3 + 256) * per_slot
    assert plain["per-sample KV cache"] == 256 * 8 * 256 * per_slot  # shared (>= 512 tokens)
    # the pallas kernel's caches come in blocks of 64 slots: 3 + 256 fed tokens take 320
    pallas = sampling.memory_bytes(big, dataclasses.replace(short, attention="pallas"), 256, 4096,
                                   prefix_rows=32, tail_len=4)
    assert pallas["per-sample KV cache"] == 256 * 8 * 320 * per_slot



def test_sampler_checks_memory_less_what_the_caller_keeps(monkeypatch, params):
    """make_sampler's check gets the devices' memory less reserved_bytes (the trainer's
    optimizer state), before compiling."""
    seen = []

    class Checked(Exception):
        pass

    def spy(model_cfg, sampling_cfg, batch, prompt_len, bytes_available, *args, **kwargs):
        seen.append((batch, prompt_len, bytes_available, kwargs["reserved_bytes"]))
        raise Checked

    monkeypatch.setattr(sampling.sharding, "device_bytes", lambda mesh: 10_000)
    monkeypatch.setattr(sampling, "check_memory", spy)
    mesh = jax.make_mesh((1, 1, 1), sharding.AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shards = sharding.param_shardings(mesh, model.logical_axes(CFG))
    prompts = sampling.Prompts(*_ragged_prompts([3, 5, 2], 6)[:2])
    with pytest.raises(Checked):
        sampling.make_sampler(mesh, CFG, BASE, shards, reserved_bytes=1_234)(
            params, prompts, jax.random.key(0))
    _, L, b, _ = prompts.check()
    assert seen == [(b, L, 10_000, 1_234)]

def test_config_validation_and_from_config(params):
    from rpt_jax.config import base_config
    section = base_config().sampling
    cfg = sampling.SamplingConfig.from_config(section, stop_ids=[7, 2, 7])
    assert cfg.stop_ids == (2, 7) and cfg.num_samples == 8 and cfg.temperature == 0.8
    hash(cfg)
    with section.unlocked():
        section.prefill_chunks = 4
    assert sampling.SamplingConfig.from_config(section).prefill_chunks == 4
    section.attention = "pallas"
    assert sampling.SamplingConfig.from_config(section).attention == "pallas"
    with pytest.raises(ValueError, match="attention='triton' is not xla/pallas"):
        sampling.SamplingConfig(attention="triton")
    section.gemm = "xla"
    assert sampling.SamplingConfig.from_config(section).gemm == "xla"
    with pytest.raises(ValueError, match="gemm='cutlass' is not auto/cublas/xla"):
        sampling.SamplingConfig(gemm="cutlass")
    section.split_down = 4
    assert sampling.SamplingConfig.from_config(section).split_down == 4
    with pytest.raises(ValueError, match="split_down=0 must be >= 1"):
        sampling.SamplingConfig(split_down=0)
    tokens, mask, _ = _ragged_prompts([3, 5], 6)
    with pytest.raises(ValueError, match="split_down=5 does not divide mlp_dim=64"):
        jax.eval_shape(lambda p: sampling.sample(p, sampling.Prompts(tokens, mask),
                                                 jax.random.key(0), CFG,
                                                 dataclasses.replace(BASE, split_down=5)),
                       params)
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.SamplingConfig(temperature=0.0)


@pytest.mark.parametrize("gemm, attention, triton_gemm", [
    ("auto", "pallas", False), ("auto", "xla", None), ("cublas", "xla", False),
    ("xla", "pallas", None)])
def test_gemm_choice(gemm, attention, triton_gemm):
    cfg = dataclasses.replace(BASE, gemm=gemm, attention=attention)
    assert cfg.compiler_options("gpu").get("xla_gpu_enable_triton_gemm") == triton_gemm
    assert cfg.compiler_options("cpu") == cfg.compiler_options("tpu") == {}


def test_make_sampler_compiles_with_the_configs_options(monkeypatch, caplog, params):
    """The GPU option itself is measured (BENCHMARKS.md), not testable here: the options that
    SamplingConfig names reach the sampler's jit, and a CPU compile accepts them."""
    seen = {}
    jit = jax.jit

    def spy(fn, **kwargs):
        seen.update(kwargs.get("compiler_options") or {})
        return jit(fn, **kwargs)

    options = {"xla_gpu_enable_triton_gemm": False}
    monkeypatch.setattr(jax, "jit", spy)
    monkeypatch.setattr(sampling.SamplingConfig, "compiler_options",
                        lambda self, platform: options)
    mesh = jax.make_mesh((1, 1, 1), sharding.AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shards = sharding.param_shardings(mesh, model.logical_axes(CFG))
    run = sampling.make_sampler(mesh, CFG, GREEDY, shards)
    assert seen == options
    assert not caplog.records
    sampling.make_sampler(mesh, CFG, dataclasses.replace(GREEDY, attention="pallas"), shards)
    assert "Pallas' interpreter on CPU" in caplog.text  # the GPU presets' kernel, run on CPU
    prompts = sampling.Prompts(*_left_pad([[5, 6, 7], [8, 9]], 4))
    out = run(jax.device_put(params, shards), prompts, jax.random.key(0))
    assert out.tokens.shape == (4, N)


def test_pallas_attention_is_refused_for_tpu_meshes():
    """Before anything is traced (the Triton kernel has no TPU lowering)."""
    from types import SimpleNamespace
    tpu_mesh = SimpleNamespace(devices=np.array([SimpleNamespace(platform="tpu")]))
    with pytest.raises(ValueError, match="attention='pallas' is a GPU .*attention='xla' on TPUs"):
        sampling.make_sampler(tpu_mesh, CFG, dataclasses.replace(BASE, attention="pallas"), None)
