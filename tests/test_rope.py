"""rpt_jax.rope: frequencies against transformers' RoPE initialisers, the rotation against numpy,
canonical strings and their errors."""
import types

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from rpt_jax import config as config_lib
from rpt_jax import rope

E, THETA = 64, 500_000.0  # Llama 3's head_dim and theta


@pytest.mark.parametrize("params", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2's
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen2.5's
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
     "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
     "mscale": 1.0, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
     "attention_factor": 1.5},
])
def test_frequencies_match_transformers(params):
    hf_cfg = transformers.LlamaConfig(hidden_size=E * 8, num_attention_heads=8, head_dim=E,
                                      max_position_embeddings=131072,
                                      rope_parameters={**params, "rope_theta": THETA})
    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    want, want_scale = (init(hf_cfg, "cpu") if init else
                        (1.0 / THETA ** (np.arange(0, E, 2) / E), 1.0))
    inv, scale = rope.frequencies(E, THETA, rope.canonical(params))
    assert inv.dtype == np.float32 and inv.shape == (E // 2,)
    np.testing.assert_allclose(inv, np.asarray(want, np.float64), rtol=1e-6)
    assert scale == pytest.approx(want_scale, rel=1e-12)


def test_apply_against_numpy():
    """Rotate-half with scaled cos / sin: x1 cos - x2 sin, x2 cos + x1 sin, per position."""
    cfg = types.SimpleNamespace(head_dim=8, rope_theta=100.0, rope_scaling=rope.canonical(
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4}))
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 100]])
    inv, scale = rope.frequencies(8, 100.0, cfg.rope_scaling)
    a = positions[..., None, None] * inv.astype(np.float64)  # [b, t, 1, e/2]
    x1, x2 = x[..., :4], x[..., 4:]
    want = scale * np.concatenate([x1 * np.cos(a) - x2 * np.sin(a),
                                   x2 * np.cos(a) + x1 * np.sin(a)], -1)
    got = rope.apply(jnp.asarray(x), jnp.asarray(positions), cfg)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    rows = rope.apply_rows(jnp.asarray(x[:, 0]), jnp.asarray(positions[:, 0]), cfg)
    np.testing.assert_allclose(np.asarray(rows), want[:, 0], atol=1e-4)


def test_canonical_strings():
    a = rope.canonical({"type": "linear", "factor": 2, "rope_theta": 1e4, "unused": 1})
    b = rope.canonical({"factor": 2.0, "rope_type": "linear"})
    assert a == b == '{"factor": 2.0, "rope_type": "linear"}'
    assert rope.parse(a) == {"factor": 2.0, "rope_type": "linear"}
    assert rope.canonical({"rope_type": "default", "rope_theta": 1e4}) == rope.canonical({}) == ""
    assert rope.parse("") == {}


@pytest.mark.parametrize("scaling, pattern", [
    ("{oops", r"model.rope_scaling='\{oops' is not JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"rope_type": "dynamic", "factor": 2.0}', "'dynamic' is not supported"),
    ('{"rope_type": "yarn", "factor": 2.0}', r"'yarn' needs \['original_max_position_embeddings'\]"),
    ('{"rope_type": "linear", "factor": 0}', "factor=0.0 must be > 0"),
    ('{"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4, '
     '"original_max_position_embeddings": 8192}', "high_freq_factor=4.0 must exceed"),
])
def test_bad_scalings_are_named(scaling, pattern):
    with pytest.raises(ValueError, match=pattern):
        rope.parse(scaling)
    config = config_lib.base_config("tiny")
    config.model.rope_scaling = scaling
    with pytest.raises(ValueError, match="model.rope_scaling"):
        config_lib.validate(config, 1)
