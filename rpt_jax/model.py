"""Llama / Qwen2 / Qwen3 decoder-only transformers as pure functions over a params pytree.

Written in plain JAX rather than Flax modules: the params are a nested dict named as Hugging Face
names the weights (`q_proj`, `gate_proj`, ...), so checkpoint conversion is a readable rename, and
every function is a pure function of (params, arrays) that jit, shardings and remat compose with.

Shapes: b batch, t tokens, s cache slots, d hidden, h heads, k kv heads, e head dim, f mlp,
v vocab, l layers. Layers are stacked on a leading axis and run with `lax.scan`.

params = {
  "embed_tokens": [v, d],
  "layers": {"input_layernorm": [l, d], "post_attention_layernorm": [l, d],
             "q_proj": {"kernel": [l, d, h, e], "bias"?: [l, h, e]},
             "k_proj"/"v_proj": {"kernel": [l, d, k, e], "bias"?: [l, k, e]},
             "q_norm"?, "k_norm"?: [l, e],  # Qwen3
             "o_proj": {"kernel": [l, h, e, d]},
             "gate_proj"/"up_proj": {"kernel": [l, d, f]}, "down_proj": {"kernel": [l, f, d]}},
  "norm": [d],
  "lm_head"?: [d, v],  # absent with tied embeddings
}
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rpt_jax import decode_attention, rope, sharding


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable architecture description (usable as a static jit argument)."""
    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    rope_scaling: str = ""  # "" plain RoPE, else a scaling's canonical JSON (rpt_jax.rope)
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm of each query / key head before RoPE (Qwen3)
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    init_std: float = 0.02
    attention: str = "xla"  # full-sequence attention: "xla" (any device) or "cudnn" (GPU, bf16)

    @classmethod
    def from_config(cls, model_config) -> "ModelConfig":
        """From the `model` section of an rpt_jax config (extra keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(model_config).items() if k in names})


# Logical axis names of every weight; sharding.RULES maps them to mesh axes.
def logical_axes(cfg: ModelConfig) -> dict:
    """A pytree like `init`'s params whose leaves are tuples of logical axis names."""
    def proj(in_axis, *out_axes, bias=False):
        p = {"kernel": ("layers", in_axis) + out_axes}
        if bias:
            p["bias"] = ("layers",) + out_axes
        return p

    layers = {
        "input_layernorm": ("layers", "norm"),
        "post_attention_layernorm": ("layers", "norm"),
        "q_proj": proj("embed", "heads", "head_dim", bias=cfg.qkv_bias),
        "k_proj": proj("embed", "kv_heads", "head_dim", bias=cfg.qkv_bias),
        "v_proj": proj("embed", "kv_heads", "head_dim", bias=cfg.qkv_bias),
        "o_proj": {"kernel": ("layers", "heads", "head_dim", "embed")},
        "gate_proj": proj("embed", "mlp"),
        "up_proj": proj("embed", "mlp"),
        "down_proj": proj("mlp", "embed"),
    }
    if cfg.qk_norm:
        layers.update(q_norm=("layers", "head_dim"), k_norm=("layers", "head_dim"))
    axes = {"embed_tokens": ("vocab", "embed"), "layers": layers, "norm": ("norm",)}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> dict:
    """jax.ShapeDtypeStruct of every weight, without allocating."""
    sizes = {"layers": cfg.num_layers, "embed": cfg.hidden_size, "norm": cfg.hidden_size,
             "vocab": cfg.vocab_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
             "head_dim": cfg.head_dim, "mlp": cfg.mlp_dim}
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda axes: jax.ShapeDtypeStruct(tuple(sizes[a] for a in axes), dtype),
                        logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Random params: normal(init_std) matrices, zero biases, unit norms."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(rng, len(leaves))
    out = []
    for (path, shape), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(shape.shape, shape.dtype))
        elif "bias" in name:
            out.append(jnp.zeros(shape.shape, shape.dtype))
        else:
            out.append(cfg.init_std * jax.random.normal(key, shape.shape, shape.dtype))
    return jax.tree.unflatten(treedef, out)


def num_params(cfg: ModelConfig) -> int:
    return sum(x.size for x in jax.tree.leaves(param_shapes(cfg)))


# ----------------------------------------------------------------------------- building blocks

def rms_norm(x, weight, eps):
    """RMSNorm computed in float32, cast back, then scaled (as transformers does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def _dense(x, p, spec, dtype):
    y = jnp.einsum(spec, x, p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def _qkv(p, x, positions, cfg):
    dtype = x.dtype
    q = _dense(x, p["q_proj"], "btd,dhe->bthe", dtype)
    k = _dense(x, p["k_proj"], "btd,dke->btke", dtype)
    v = _dense(x, p["v_proj"], "btd,dke->btke", dtype)
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.rms_norm_eps), rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    return rope.apply(q, positions, cfg), rope.apply(k, positions, cfg), v


def _attend(q, k, v, allowed):
    """Grouped-query attention. q [b,t,h,e]; k,v [b,s,k,e]; allowed [b,t,s] bool -> [b,t,h,e]."""
    b, t, h, e = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, e)
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (e ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v)
    return out.reshape(b, t, h, e)


def _mlp(p, x):
    dtype = x.dtype
    gate = jnp.einsum("btd,df->btf", x, p["gate_proj"]["kernel"].astype(dtype))
    up = jnp.einsum("btd,df->btf", x, p["up_proj"]["kernel"].astype(dtype))
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return jnp.einsum("btf,fd->btd", hidden, p["down_proj"]["kernel"].astype(dtype))


def _layer(x, p, positions, allowed, cfg, attend=None):
    """One decoder layer over a full sequence; returns (x, (k, v)) for cache filling.
    attend(q, k, v) -> [b, t, h, e] replaces self-attention under `allowed` when given."""
    h = rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
    q, k, v = _qkv(p, h, positions, cfg)
    if attend is not None:
        attn = attend(q, k, v)
    elif cfg.attention == "cudnn":  # fused kernel: no [b, h, t, t] scores in memory
        attn = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="cudnn")
    else:
        attn = _attend(q, k, v, allowed)
    x = x + jnp.einsum("bthe,hed->btd", attn, p["o_proj"]["kernel"].astype(x.dtype))
    h = rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
    x = sharding.constrain(x + _mlp(p, h), ("batch", "length", "act_embed"))
    return x, (k, v)


def _remat(fn, mode):
    if mode == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if mode == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


def embed(params, tokens, cfg):
    """tokens [b, t] -> [b, t, d]. The table's hidden dim is gathered (FSDP) before the lookup:
    a lookup in a hidden-split table gives hidden-split rows, which the partitioner can only
    turn into batch-split rows by replicating them in full."""
    table = sharding.constrain(params["embed_tokens"].astype(cfg.dtype), ("vocab", "act_embed"))
    return sharding.constrain(table[tokens], ("batch", "length", "act_embed"))


def logits_from_hidden(params, h, cfg):
    """Final norm and LM head: h [b, t, d] -> float32 logits [b, t, v]."""
    h = rms_norm(h, params["norm"], cfg.rms_norm_eps)
    if cfg.tie_embeddings:
        w = params["embed_tokens"].astype(h.dtype)
        return jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
    w = params["lm_head"].astype(h.dtype)
    return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)


def causal_mask(segment_ids):
    """[b, t] segment ids (0 = padding) -> [b, t, t] bool: same segment and not in the future.
    A padding token attends to itself alone (no token reads it), so that no query row is empty:
    fused kernels (cuDNN) may return NaN for one, and a NaN in a padding slot's key or value
    poisons every query whose zero weight multiplies it."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    pad_self = jnp.eye(t, dtype=bool)[None] & (segment_ids[:, :, None] == 0)
    return (causal[None] & same & (segment_ids[:, None, :] != 0)) | pad_self


# ----------------------------------------------------------------------------- entry points

def hidden_states(params, tokens, cfg: ModelConfig, positions=None, segment_ids=None):
    """Full-sequence pass up to the final norm. tokens [b, t] int -> ([b, t, d], (k, v) per layer).

    positions [b, t] default to 0..t-1; segment_ids [b, t] (0 = padding) restrict attention to
    earlier tokens of the same segment. k, v are [l, b, t, k, e].
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    allowed = causal_mask(segment_ids)
    x = embed(params, tokens, cfg)

    def body(x, p):
        return _layer(x, p, positions, allowed, cfg)

    x, kv = jax.lax.scan(_remat(body, cfg.remat), x, params["layers"])
    return x, kv


def _attend_after_prompt(q, k, v, prompt_k, prompt_v, to_prompt, allowed, g, fused=None):
    """Attention of g rows per prompt over their prompt's keys and their own, one softmax.

    q [n, t, h, e]; k, v [n, t, k, e]; prompt_k, prompt_v [n / g, p, k, e]; to_prompt [n, t, p]
    and allowed [n, t, t] bool. Row i * g + j reads prompt row i. Returns [n, t, h, e].
    fused: a jax.nn.dot_product_attention implementation ("cudnn") over the prompt's keys
    copied per row (g copies of [p, k, e] per layer, far less than the prompt compute saved),
    instead of einsums that read them once but materialise the float32 scores.
    """
    if fused:
        keys = jnp.concatenate([jnp.repeat(prompt_k, g, axis=0), k], axis=1)
        values = jnp.concatenate([jnp.repeat(prompt_v, g, axis=0), v], axis=1)
        mask = jnp.concatenate([to_prompt, allowed], axis=-1)[:, None]  # [n, 1, t, p + t]
        return jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation=fused)
    n, t, h, e = q.shape
    kv, b, p = k.shape[2], n // g, prompt_k.shape[1]
    q = q.reshape(b, g, t, kv, h // kv, e)
    neg = jnp.finfo(jnp.float32).min
    to_prompt = to_prompt.reshape(b, g, 1, 1, t, p)
    allowed = allowed.reshape(b, g, 1, 1, t, t)
    s_p = jnp.einsum("bjtkqe,bpke->bjkqtp", q, prompt_k, preferred_element_type=jnp.float32)
    s_r = jnp.einsum("bjtkqe,bjske->bjkqts", q, k.reshape(b, g, t, kv, e),
                     preferred_element_type=jnp.float32)
    scores = jnp.concatenate([jnp.where(to_prompt, s_p * e ** -0.5, neg),
                              jnp.where(allowed, s_r * e ** -0.5, neg)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = (jnp.einsum("bjkqtp,bpke->bjtkqe", probs[..., :p], prompt_v)
           + jnp.einsum("bjkqts,bjske->bjtkqe", probs[..., p:], v.reshape(b, g, t, kv, e)))
    return out.reshape(n, t, h, e)


def hidden_states_shared_prompt(params, tokens, cfg: ModelConfig, positions, segment_ids,
                                g: int, prompt_len: int):
    """`hidden_states` of rows whose first prompt_len tokens repeat in groups of g (a context's
    G samples), with each prompt computed once instead of g times.

    tokens, positions, segment_ids [n, s] (n = b * g; rows i * g .. i * g + g - 1 carry the
    same prompt columns). Returns [n, s - p + 1, d]: columns p - 1 .. s - 1 (the last prompt
    token, which predicts the first response token, then the responses), the only ones a loss
    on the responses reads; the last prompt column is its one computation repeated g times (the
    backward sums the g gradients). Equal to hidden_states(...)[0][:, p - 1:] at every real
    token up to float reordering (padding positions, which no real token reads, differ).
    """
    n, s = tokens.shape
    if n % g or not 0 < prompt_len < s:
        raise ValueError(f"rows [{n}, {s}] do not split into groups of g={g} with a prompt of "
                         f"{prompt_len} columns")
    p = prompt_len
    first = lambda x: x[::g, :p]  # noqa: E731  (one prompt per group)
    seg_p, seg_r = first(segment_ids), segment_ids[:, p:]
    allowed_p = causal_mask(seg_p)
    same_prompt = jnp.repeat(seg_p, g, axis=0)  # [n, p]
    to_prompt = (seg_r[:, :, None] == same_prompt[:, None, :]) & (same_prompt[:, None, :] != 0)
    allowed_r = causal_mask(seg_r)
    pos_p, pos_r = first(positions), positions[:, p:]

    def body(xs, layer):
        x_p, x_r = xs
        x_p, (k_p, v_p) = _layer(x_p, layer, pos_p, allowed_p, cfg)
        attend = functools.partial(_attend_after_prompt, prompt_k=k_p, prompt_v=v_p,
                                   to_prompt=to_prompt, allowed=allowed_r, g=g,
                                   fused="cudnn" if cfg.attention == "cudnn" else None)
        x_r, _ = _layer(x_r, layer, pos_r, None, cfg, attend)
        return (x_p, x_r), None

    xs = (embed(params, first(tokens), cfg), embed(params, tokens[:, p:], cfg))
    (x_p, x_r), _ = jax.lax.scan(_remat(body, cfg.remat), xs, params["layers"])
    return jnp.concatenate([jnp.repeat(x_p[:, -1:], g, axis=0), x_r], axis=1)


def forward(params, tokens, cfg: ModelConfig, positions=None, segment_ids=None):
    """Training / scoring forward: tokens [b, t] -> float32 logits [b, t, v]."""
    h, _ = hidden_states(params, tokens, cfg, positions, segment_ids)
    return logits_from_hidden(params, h, cfg)


# ----------------------------------------------------------------------------- sampling decode path
# g samples per context: r = b * g rows. The sampler either keeps one prompt cache per context
# (b rows, read once per step for its g samples; long prompts) next to a per-sample response
# cache, or copies the prompt into each sample's cache (one attention part, fewer kernels;
# short prompts). Caches are tuples of per-layer arrays [rows, k, slots, e], so a step updates
# each layer's cache in place inside the sampler's while loop (no stacked copy, no concatenate).
# Weights are re-laid out once per sampling call (`decoding_weights`): cast to the compute
# dtype, split per layer, and fused into plain 2-D matrices (q|k|v grouped per kv head, gate|up
# interleaved per MLP unit) so that a step runs 4 matmuls per layer without weight transposes,
# and a tensor-sharded head / MLP axis stays sharded the same way.

def decoding_weights(params, cfg: ModelConfig) -> dict:
    """Params re-laid out for decoding: {"embed_tokens", "norm", "lm_head"?, "layers": tuple}.

    Each layer: "qkv" [d, k*(q+2)*e] (per kv head: its q = h // k query heads, its key, its
    value), "qkv_bias" [k*(q+2)*e] (if any), "o" [h*e, d], "gate_up" [d, f*2] (gate and up of
    each MLP unit side by side), "down" [f, d], the two norms and "q_norm" / "k_norm" [e] (if
    any), all in the compute dtype.
    """
    dtype = jnp.dtype(cfg.dtype)
    d, h, k, e, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    nq = h // k
    L = jax.tree.map(lambda x: x.astype(dtype), params["layers"])

    def group(q, kk, v):  # [..., h, e], [..., k, e], [..., k, e] -> [..., k, q+2, e]
        q = q.reshape(q.shape[:-2] + (k, nq, e))
        return jnp.concatenate([q, kk[..., None, :], v[..., None, :]], axis=-2)

    qkv = group(L["q_proj"]["kernel"], L["k_proj"]["kernel"], L["v_proj"]["kernel"])
    stacked = {
        "input_layernorm": L["input_layernorm"],
        "post_attention_layernorm": L["post_attention_layernorm"],
        "qkv": qkv.reshape(cfg.num_layers, d, k * (nq + 2) * e),
        "o": L["o_proj"]["kernel"].reshape(cfg.num_layers, h * e, d),
        "gate_up": jnp.stack([L["gate_proj"]["kernel"], L["up_proj"]["kernel"]], axis=-1)
                      .reshape(cfg.num_layers, d, f * 2),
        "down": L["down_proj"]["kernel"],
    }
    if cfg.qkv_bias:
        stacked["qkv_bias"] = group(L["q_proj"]["bias"], L["k_proj"]["bias"],
                                    L["v_proj"]["bias"]).reshape(cfg.num_layers, -1)
    if cfg.qk_norm:
        stacked.update(q_norm=L["q_norm"], k_norm=L["k_norm"])
    out = {name: params[name].astype(dtype)
           for name in ("embed_tokens", "norm", "lm_head") if name in params}
    out["layers"] = tuple(jax.tree.map(lambda x, i=i: x[i], stacked)
                          for i in range(cfg.num_layers))
    return out


def decoding_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every `decoding_weights` leaf (same tree)."""
    layer = {"input_layernorm": ("norm",), "post_attention_layernorm": ("norm",),
             "qkv": ("embed", "heads"), "o": ("heads", "embed"), "gate_up": ("embed", "mlp"),
             "down": ("mlp", "embed")}
    if cfg.qkv_bias:
        layer["qkv_bias"] = ("heads",)
    if cfg.qk_norm:
        layer.update(q_norm=("head_dim",), k_norm=("head_dim",))
    axes = {"embed_tokens": ("vocab", "embed"), "norm": ("norm",),
            "layers": tuple(dict(layer) for _ in range(cfg.num_layers))}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def prefill_prompt(params, tokens, cfg: ModelConfig, positions, segment_ids,
                   cache_dtype="bfloat16") -> dict:
    """Run prompt rows once for their keys and values. tokens, positions, segment_ids [b, t]
    (segment 0 = padding, anywhere in the row).

    Returns the prompt cache {"k", "v": tuples of l arrays [b, k, t, e], "valid": [b, t] bool}.
    """
    _, (k, v) = hidden_states(params, tokens, cfg, positions, segment_ids)
    k = jnp.swapaxes(k, 2, 3).astype(cache_dtype)  # [l, b, k, t, e]
    v = jnp.swapaxes(v, 2, 3).astype(cache_dtype)
    return {"k": tuple(k[i] for i in range(cfg.num_layers)),
            "v": tuple(v[i] for i in range(cfg.num_layers)),
            "valid": segment_ids != 0}


def init_response_cache(cfg: ModelConfig, rows: int, size: int, dtype="bfloat16",
                        prefix=None, zero=None) -> dict:
    """A per-sample cache {"k", "v": tuples of l arrays [r, k, s, e], "valid": [r, s] bool}.

    Empty, or with a cache of r rows and t <= s slots (a prompt cache copied per sample) in
    slots 0..t-1: for short prompts one part per sample costs fewer kernels than two. zero: the
    scalar the keys and values are filled with (a value computed late delays the allocation).
    """
    shape = (rows, cfg.num_kv_heads, size, cfg.head_dim)
    zero = jnp.zeros((), dtype) if zero is None else zero.astype(dtype)
    cache = {"k": tuple(jnp.broadcast_to(zero, shape) for _ in range(cfg.num_layers)),
             "v": tuple(jnp.broadcast_to(zero, shape) for _ in range(cfg.num_layers)),
             "valid": jnp.zeros((rows, size), bool)}
    if prefix is not None:
        put = lambda c, x: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0,) * c.ndim)  # noqa: E731
        cache = {"k": tuple(map(put, cache["k"], prefix["k"])),
                 "v": tuple(map(put, cache["v"], prefix["v"])),
                 "valid": put(cache["valid"], prefix["valid"])}
    return cache


def _part_valid(cache):
    """Which slots the g readers of each cache row may see: [b, g, s] bool ([b, 1, s] when all
    see the same); `visible` [b, g] int32 limits each reader to the slots below it."""
    valid = cache["valid"][:, None, :]
    if "visible" in cache:
        slots = jnp.arange(valid.shape[-1], dtype=jnp.int32)
        valid = valid & (slots < cache["visible"][:, :, None])
    return valid


def _part_limits(cache, rows: int, nq: int, written=None, active=None):
    """The pallas kernel's (valid [b, s], limit [b, g * nq]) of a cache part read by `rows`
    query rows of nq heads each: readers stop at `visible`, at the slot after `written` (the
    index a step writes: a scalar or per row), or at the end; rows not `active` ([rows] bool)
    read nothing."""
    b, s = cache["valid"].shape
    if "visible" in cache:
        limit = cache["visible"].astype(jnp.int32)
    else:  # written: a scalar, or [b] (each row's own slot)
        end = s if written is None else jnp.reshape(written + 1, (-1, 1))
        limit = jnp.broadcast_to(jnp.asarray(end, jnp.int32), (b, rows // b))
    if active is not None:
        limit = jnp.where(active.reshape(limit.shape), limit, 0)
    return cache["valid"], jnp.repeat(limit, nq, axis=1)


def _decode_attend(q, parts):
    """Decode attention with one softmax over several key/value parts.

    q [r, k, q, e] (q query heads per kv head). Each part is (keys, values [b, k, s, e], valid
    [b, g or 1, s]) with b * g = r: query row i*g + j reads row i of the part, so g rows share
    it (a context's samples, or a document's contexts); g = 1 for a per-sample cache.
    Returns float32 [r, k, q, e].
    """
    r, kv, nq, e = q.shape
    neg = jnp.finfo(jnp.float32).min

    def grouped(x, b):  # [r, ...] -> [b, g, ...]; per-sample parts keep [r, ...]
        return x if b == r else x.reshape((b, r // b) + x.shape[1:])

    def spec(b, out):  # einsum of grouped q / probs with the part's [b, k, s, e]
        g = "" if b == r else "g"
        return {"s": f"b{g}kqe,bkse->b{g}kqs", "e": f"b{g}kqs,bkse->b{g}kqe"}[out]

    scores = []
    for keys, _, valid in parts:
        b = keys.shape[0]
        s = jnp.einsum(spec(b, "s"), grouped(q, b).astype(keys.dtype), keys,
                       preferred_element_type=jnp.float32)
        mask = valid[:, 0, None, None, :] if b == r else valid[:, :, None, None, :]
        scores.append(jnp.where(mask, s * e ** -0.5, neg).reshape(r, kv, nq, -1))
    m = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores])
    probs = [jnp.exp(s - m) for s in scores]
    denom = sum(p.sum(-1, keepdims=True) for p in probs)
    out = 0.0
    for (_, values, _), p in zip(parts, probs):
        b = values.shape[0]
        o = jnp.einsum(spec(b, "e"), grouped(p, b).astype(values.dtype), values,
                       preferred_element_type=jnp.float32)
        out = out + o.reshape(r, kv, nq, e)
    return out / denom


def _decode_attend_pallas(q, parts, own=(), **kernel):
    """`_decode_attend` with the fused kernel (decode_attention): parts are (keys, values,
    (valid [b, s], limit [b, g * nq])); own: (out [r, k, q, e], lse [r, k, q]) of parts already
    attended (`decode_attention.step_attention`); kernel: `decode_attention.part_attention`'s
    launch options. Returns float32 [r, k, q, e]."""
    r, kv, nq, e = q.shape
    outs = list(own)
    for keys, values, (valid, limit) in parts:
        b = keys.shape[0]
        g = r // b
        grouped = jnp.swapaxes(q.reshape(b, g, kv, nq, e), 1, 2).reshape(b, kv, g * nq, e)
        out, lse = decode_attention.sharded_part_attention(
            grouped.astype(keys.dtype), keys, values, valid, limit, **kernel)
        back = lambda x: jnp.swapaxes(  # noqa: E731
            x.reshape((b, kv, g, nq) + x.shape[3:]), 1, 2).reshape((r, kv, nq) + x.shape[3:])
        outs.append((back(out), back(lse)))
    return decode_attention.merge(outs)


def _down_projection(x, y, w, split: int):
    """x + y @ w: x [r, d] the residual stream, y [r, f], w [f, d]. split > 1: as `split`
    partial products over slices of f (one batched GEMM with `split` times the output tiles,
    which at decode's few rows keeps more of a GPU busy), summed in float32 with x."""
    if split == 1:
        return x + y @ w
    r, f = y.shape
    if f % split:
        raise ValueError(f"sampling.split_down={split} does not divide mlp_dim={f}")
    parts = jnp.einsum("rsk,skn->srn", y.reshape(r, split, f // split),
                       w.reshape(split, f // split, w.shape[1]),
                       preferred_element_type=jnp.float32)
    return (x.astype(jnp.float32) + parts.sum(0)).astype(x.dtype)


def decode_step(weights, tokens, positions, frozen, cache, index, cfg: ModelConfig,
                attention: str = "xla", active=None, split_down: int = 1):
    """One decode step of r rows. weights from `decoding_weights`; tokens, positions [r] int.

    Writes the new keys / values to slot `index` (a scalar, or [r]: each row's own) of the
    per-sample `cache` ({"k", "v": tuples of l arrays [r, k, s, e], "valid": [r, s]}) and
    attends over its valid slots plus those of every read-only cache in `frozen`: a
    `prefill_prompt` cache of b rows, read by g = r / b rows each (row i*g + j reads row i;
    optional "visible" [b, g] int32 limits each reader to the slots below it), or earlier
    per-sample blocks (b = r).
    attention: "xla" (einsums and a softmax) or "pallas" (decode_attention's fused kernel,
    which also skips the slots past `index`, and every slot of the rows that are not
    `active` ([r] bool, optional: finished samples, whose logits are then meaningless);
    every cache's slots a multiple of 16; the step's rope, its cache write and its attention
    over `cache` are one kernel a layer, `decode_attention.step_attention`).
    split_down: the down projection as this many GEMMs over slices of mlp_dim
    (`_down_projection`).
    Returns (float32 logits [r, v], cache).
    """
    r = tokens.shape[0]
    kv, e = cfg.num_kv_heads, cfg.head_dim
    nq = cfg.num_heads // kv
    dtype = jnp.dtype(cfg.dtype)
    if jnp.ndim(index):  # each row its own slot (continuous batching: rpt_jax.continuous)
        rows = jnp.arange(r)
        write = lambda c, x: c.at[rows, :, index].set(x[:, :, 0].astype(c.dtype))  # noqa: E731
        valid = cache["valid"].at[rows, index].set(True)
    else:
        write = lambda c, x: jax.lax.dynamic_update_slice(  # noqa: E731
            c, x.astype(c.dtype), (0, 0, index, 0))
        valid = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((r, 1), bool), (0, index))
    if attention == "pallas":
        attend = _decode_attend_pallas
        reads = [_part_limits(c, r, nq, active=active) for c in frozen] + [
            _part_limits({"valid": valid}, r, nq, index, active)]
    else:
        attend = _decode_attend
        reads = [_part_valid(c) for c in frozen] + [valid[:, None, :]]
    # rope, the cache write and the attention over `cache` in one kernel
    fused = attention == "pallas" and decode_attention.FUSE_STEP
    if fused:
        slot = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (r,))
        read = slot if active is None else jnp.where(active, slot, 0)
        cos, sin = rope.angles(positions, cfg)  # [r, e/2]
    x = weights["embed_tokens"][tokens]  # [r, d]
    new_k, new_v = [], []
    for i, p in enumerate(weights["layers"]):
        h = rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
        qkv = h @ p["qkv"]
        if "qkv_bias" in p:
            qkv = qkv + p["qkv_bias"]
        qkv = qkv.reshape(r, kv, nq + 2, e)
        if cfg.qk_norm:
            qkv = jnp.concatenate([rms_norm(qkv[:, :, :nq], p["q_norm"], cfg.rms_norm_eps),
                                   rms_norm(qkv[:, :, nq:nq + 1], p["k_norm"], cfg.rms_norm_eps),
                                   qkv[:, :, nq + 1:]], axis=2)
        others = [(c["k"][i], c["v"][i], m) for c, m in zip(frozen, reads)]
        if fused:
            step = functools.partial(decode_attention.sharded_step_attention, qkv, cos, sin,
                                     cache["k"][i], cache["v"][i], cache["valid"], slot, read)
            if others:  # they read the queries after the kernel's rope
                out, lse, q, ck, cv = step(alone=False)
                attn = attend(q, others, [(out, lse)])
            else:
                attn, ck, cv = step()
        else:
            q = rope.apply_rows(qkv[:, :, :nq], positions, cfg)  # [r, k, q, e]
            k = rope.apply_rows(qkv[:, :, nq:nq + 1], positions, cfg)  # [r, k, 1, e]
            ck, cv = write(cache["k"][i], k), write(cache["v"][i], qkv[:, :, nq + 1:])
            attn = attend(q, others + [(ck, cv, reads[-1])])
        new_k.append(ck)
        new_v.append(cv)
        x = x + attn.reshape(r, kv * nq * e).astype(dtype) @ p["o"]
        h = rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
        gate_up = (h @ p["gate_up"]).reshape(r, cfg.mlp_dim, 2)
        x = _down_projection(x, jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1], p["down"],
                             split_down)
    logits = logits_from_hidden(weights, x[:, None], cfg)[:, 0]
    return logits, {"k": tuple(new_k), "v": tuple(new_v), "valid": valid}
