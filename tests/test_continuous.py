"""Continuous batching (rpt_jax.continuous): rows decoded through fewer lanes, a finished row's
lane refilled with the next row, give the same samples as all rows decoded at once."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rpt_jax import continuous, sampling
from test_sampling import (CFG, SAMPLED, _jit_sample, _ragged_prompts, grouped,  # noqa: F401
                           on_mesh, params)  # (fixtures)

# many stop ids: rows end anywhere from the first token to max_new_tokens
UNEVEN = dataclasses.replace(SAMPLED, max_new_tokens=12, cache_layout="per_sample",
                             prefill_chunks=1, stop_ids=tuple(range(3, CFG.vocab_size, 9)))
_jit_lanes = jax.jit(continuous.sample, static_argnums=(3, 4, 5, 6))


@pytest.fixture(scope="module")
def prompts():
    tokens, mask, _ = _ragged_prompts([3, 9, 5, 12, 7, 2], 16, seed=3)
    return sampling.Prompts(tokens, mask)


@pytest.fixture(scope="module")
def static(params, prompts):  # noqa: F811
    return _jit_sample(params, prompts, jax.random.key(4), CFG, UNEVEN, 0)


SHARED = dataclasses.replace(UNEVEN, cache_layout="shared")


@pytest.fixture(scope="module")
def static_shared(params, prompts):  # noqa: F811
    return _jit_sample(params, prompts, jax.random.key(4), CFG, SHARED, 0)


def _assert_same(got, want, atol=1e-5):
    """Same tokens; log-probs within a few float32 ulps (two programs, two summation orders:
    3e-6 apart on an AMD EPYC's XLA:CPU, 1e-6 on the machines before)."""
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.finished, want.finished)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=atol)


@pytest.mark.parametrize("lanes,refill,split_down",
                         [(18, 0, 1), (4, 1, 1), (5, 0, 4), (6, 4, 1)])
def test_lanes_give_the_samples_of_all_rows_at_once(params, prompts, static, lanes, refill,  # noqa: F811
                                                    split_down):
    """18 rows (6 contexts x G = 3) through 18, 4, 5 or 6 lanes, refilled one, an eighth
    (at least one) or four at a time: tokens, lengths and stop flags equal, logprobs to 1e-5
    (float32 sums in another order, the down projection in 4 slices of mlp_dim too)."""
    lengths = np.asarray(static.lengths)
    assert len(set(lengths)) >= 4 and lengths.min() < 4 and lengths.max() == 12  # uneven
    cfg = dataclasses.replace(UNEVEN, lanes=lanes, refill=refill, split_down=split_down)
    _assert_same(_jit_lanes(params, prompts, jax.random.key(4), CFG, cfg, 0, 1), static)


@pytest.mark.parametrize("lanes,refill", [(18, 0), (6, 1), (9, 2)])
def test_shared_prompt_slots_give_the_samples_of_all_rows_at_once(
        params, prompts, static, static_shared, lanes, refill):  # noqa: F811
    """The shared layout: slots of G = 3 lanes reading one copy of their context's prompt, a
    slot refilled once its 3 samples are done; same samples as the static shared layout (and
    as the per-sample one, to rounding)."""
    cfg = dataclasses.replace(SHARED, lanes=lanes, refill=refill)
    got = _jit_lanes(params, prompts, jax.random.key(4), CFG, cfg, 0, 1)
    _assert_same(got, static_shared)
    _assert_same(got, static)
    with pytest.raises(ValueError, match="whole slots of 3 lanes"):
        _jit_lanes(params, prompts, jax.random.key(4), CFG, dataclasses.replace(cfg, lanes=4),
                   0, 1)


@pytest.mark.parametrize("layout", ["per_sample", "shared"])
def test_document_grouped_prompts_through_lanes(params, grouped, layout):  # noqa: F811
    """Contexts cut from documents (prefix rows read up to each context's limit, 3 tail tokens
    fed before sampling): the samples of the static sampler."""
    prompts, _, _ = grouped
    cfg = dataclasses.replace(UNEVEN, max_new_tokens=7, cache_layout=layout)
    want = _jit_sample(params, prompts, jax.random.key(6), CFG, cfg, 0)
    got = _jit_lanes(params, prompts, jax.random.key(6), CFG,
                     dataclasses.replace(cfg, lanes=6, refill=1), 0, 1)
    _assert_same(got, want)


def test_lanes_on_eight_devices(params, prompts, static):  # noqa: F811
    """make_sampler with lanes on a (2, 2, 2) mesh: 4 devices over the data axes, 2 lanes
    each serving that device's rows; the single-device static samples."""
    run, sharded_params, _ = on_mesh(params, (2, 2, 2), dataclasses.replace(UNEVEN, lanes=8))
    got = run(sharded_params, sampling.Prompts(prompts.tokens[:4], prompts.mask[:4]),
              jax.random.key(4))
    rows = 4 * UNEVEN.num_samples
    assert len(got.tokens.devices()) == 8
    want = jax.tree.map(lambda x: x[:rows], static)
    _assert_same(got, want)
    shared, _, _ = on_mesh(params, (2, 2, 2), dataclasses.replace(SHARED, lanes=12))
    _assert_same(shared(sharded_params, sampling.Prompts(prompts.tokens[:4], prompts.mask[:4]),
                        jax.random.key(4)), want)
    bad, _, _ = on_mesh(params, (2, 2, 2), dataclasses.replace(UNEVEN, lanes=6))
    with pytest.raises(ValueError, match="the slots and the 4 prefix rows must split over"):
        bad(sharded_params, sampling.Prompts(prompts.tokens[:4], prompts.mask[:4]),
            jax.random.key(4))


@pytest.mark.parametrize("layout,lanes", [("per_sample", 4), ("shared", 6)])
def test_lanes_with_pallas_attention(params, prompts, static, layout, lanes):  # noqa: F811
    """The fused kernel reads each lane's slots up to its own write position (and a shared
    slot's prompt up to its context's limit, nothing for finished lanes)."""
    cfg = dataclasses.replace(UNEVEN, lanes=lanes, refill=2, attention="pallas",
                              cache_layout=layout)
    # float32; the shared layout's two parts merge in another order than one part
    _assert_same(_jit_lanes(params, prompts, jax.random.key(4), CFG, cfg, 0, 1), static,
                 atol=3e-5)


def test_lanes_config_and_memory():
    with pytest.raises(ValueError, match="cache_blocks=1"):
        dataclasses.replace(UNEVEN, lanes=4, cache_blocks=2)
    every = sampling.memory_bytes(CFG, UNEVEN, 64, 32)
    lanes = sampling.memory_bytes(CFG, dataclasses.replace(UNEVEN, lanes=16), 64, 32)
    assert lanes["per-sample KV cache"] * 12 == every["per-sample KV cache"]  # 16 of 192 rows
    assert lanes["prompt KV cache"] == every["prompt KV cache"]
    # shared: 48 lanes = 16 slots, each with a copy of its context's prompt
    every = sampling.memory_bytes(CFG, SHARED, 64, 32)
    lanes = sampling.memory_bytes(CFG, dataclasses.replace(SHARED, lanes=48), 64, 32)
    assert lanes["per-sample KV cache"] * 4 == every["per-sample KV cache"]
    assert lanes["prompt KV cache"] * 64 == every["prompt KV cache"] * (64 + 16)
    assert sampling.SamplingConfig.from_config(ml_collections.ConfigDict(dict(
        num_samples=2, temperature=1.0, top_k=0, top_p=1.0, greedy=False,
             max_new_tokens=4, cache_dtype="float32", lanes=8, refill=2))).lanes == 8


def test_split_down_reaches_the_lanes_decode_step(params, prompts):  # noqa: F811
    cfg = dataclasses.replace(UNEVEN, lanes=4, split_down=5)
    with pytest.raises(ValueError, match="split_down=5 does not divide mlp_dim=64"):
        jax.eval_shape(lambda p: continuous.sample(p, prompts, jax.random.key(4), CFG, cfg, 0,
                                                   1), params)


def test_greedy_through_lanes(params, prompts):  # noqa: F811
    cfg = dataclasses.replace(UNEVEN, greedy=True)
    want = _jit_sample(params, prompts, jax.random.key(0), CFG, cfg, 0)
    got = _jit_lanes(params, prompts, jax.random.key(0), CFG,
                     dataclasses.replace(cfg, lanes=7), 0, 1)
    _assert_same(got, want)
    assert jnp.all(got.lengths >= 1)
