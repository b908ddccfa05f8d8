"""Rotary position embedding as Hugging Face Llama / Qwen2 apply it (rotate-half layout), with
the static RoPE scalings of their checkpoints: Llama 3.x ("llama3"), linear position
interpolation ("linear") and YaRN ("yarn", e.g. Qwen2.5's long-context configs).

A model's RoPE is (head_dim, rope_theta, rope_scaling). rope_scaling is "" for plain RoPE, else
the canonical JSON of HF's rope_scaling / rope_parameters dict (`canonical`): one hashable string
that ModelConfig, the ml-collections config, the command line and config.json all carry as is.
The inverse frequencies are computed on the host in float64 and enter jit as float32 constants;
scalings that depend on the sequence length ("dynamic", "longrope") are refused by name.
"""
from __future__ import annotations

import functools
import json
import math

import jax.numpy as jnp
import numpy as np

# per scaling type: its required keys, then its optional keys (HF names)
SCALINGS = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "truncate")),
}
_INTS = ("original_max_position_embeddings",)
_BOOLS = ("truncate",)


def canonical(params: dict, where: str = "rope_scaling") -> str:
    """The rope_scaling string of an HF-style dict ({"rope_type": ..., "factor": ..., ...});
    "" for plain RoPE. Keys that do not shape the frequencies (rope_theta, ...) are dropped.
    Raises ValueError naming `where` for a type rpt_jax does not compute or a missing key."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return ""
    if kind not in SCALINGS:
        raise ValueError(f"{where}: RoPE scaling {kind!r} is not supported (rpt_jax computes "
                         f"{['default', *SCALINGS]}; 'dynamic' and 'longrope' depend on the "
                         f"sequence length)")
    required, optional = SCALINGS[kind]
    missing = [k for k in required if params.get(k) is None]
    if missing:
        raise ValueError(f"{where}: RoPE scaling {kind!r} needs {missing}")
    out = {"rope_type": kind}
    for k in required + optional:
        v = params.get(k)
        if v is not None:
            out[k] = int(v) if k in _INTS else bool(v) if k in _BOOLS else float(v)
    if out["factor"] <= 0:
        raise ValueError(f"{where}: factor={out['factor']} must be > 0")
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor={out['high_freq_factor']} must exceed "
                         f"low_freq_factor={out['low_freq_factor']}")
    return json.dumps(out, sort_keys=True)


def parse(scaling: str, where: str = "model.rope_scaling") -> dict:
    """The dict of a rope_scaling string ({} for plain RoPE); raises ValueError naming `where`."""
    if not scaling:
        return {}
    try:
        params = json.loads(scaling)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}={scaling!r} is not JSON: {e}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{where}={scaling!r} is not a JSON object")
    return json.loads(canonical(params, where) or "{}")


@functools.lru_cache(maxsize=64)
def frequencies(head_dim: int, theta: float, scaling: str = "") -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] float32 in radians per position, the factor cos and
    sin are scaled by), as transformers' rope initialisers compute them."""
    e = head_dim
    inv = 1.0 / theta ** (np.arange(0, e, 2, dtype=np.float64) / e)
    p = parse(scaling)
    kind, scale = p.get("rope_type", "default"), 1.0
    if kind == "linear":
        inv = inv / p["factor"]
    elif kind == "llama3":
        old = p["original_max_position_embeddings"]
        low, high = old / p["low_freq_factor"], old / p["high_freq_factor"]  # wavelengths
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
        mid = (1 - smooth) * inv / p["factor"] + smooth * inv
        inv = np.where(wavelen > low, inv / p["factor"], np.where(wavelen < high, inv, mid))
    elif kind == "yarn":
        inv, scale = _yarn(inv, e, theta, p)
    return inv.astype(np.float32), float(scale)


def _yarn(inv, e, theta, p):
    """YaRN (arXiv 2309.00071): interpolate the low frequencies by `factor`, keep the high ones,
    a linear ramp between (over dims set by beta_fast / beta_slow rotations), scale cos / sin."""
    factor, old = p["factor"], p["original_max_position_embeddings"]

    def mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    scale = p.get("attention_factor")
    if scale is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            scale = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            scale = mscale(factor)

    def dim(rotations):  # the dim whose wavelength fits `rotations` times in `old` positions
        return e * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim(p.get("beta_fast") or 32.0), dim(p.get("beta_slow") or 1.0)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, e - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = np.clip((np.arange(e // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (the frequency as is), 0: interpolate (divided by factor)
    return inv / factor * (1 - keep) + inv * keep, scale


def angles(positions, cfg):
    """(cos, sin) [..., e / 2] float32 at integer positions [...] for cfg's RoPE (cfg: anything
    with head_dim, rope_theta and rope_scaling, e.g. model.ModelConfig)."""
    inv, scale = frequencies(cfg.head_dim, float(cfg.rope_theta), cfg.rope_scaling)
    a = positions.astype(jnp.float32)[..., None] * inv
    cos, sin = jnp.cos(a), jnp.sin(a)
    return (cos, sin) if scale == 1.0 else (cos * scale, sin * scale)


def apply(x, positions, cfg):
    """x [b, t, n, e] rotated at positions [b, t]; the result has x's dtype."""
    cos, sin = angles(positions, cfg)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rows(x, positions, cfg):
    """`apply` for one token per row: x [r, ..., e], positions [r]."""
    flat = x.reshape(x.shape[0], 1, -1, x.shape[-1])
    return apply(flat, positions[:, None], cfg).reshape(x.shape)


def hf_params(cfg) -> dict:
    """cfg's RoPE as an HF rope_parameters dict (transformers >= 5)."""
    return {"rope_type": "default", "rope_theta": cfg.rope_theta, **parse(cfg.rope_scaling)}
