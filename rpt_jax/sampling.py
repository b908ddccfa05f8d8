"""Jitted sampling of G continuations per prompt under a device mesh.

One prefill per context, then a `lax.while_loop` of KV-cached decode steps over all b * g samples
that exits as soon as every sample has stopped. The g samples of a context either read that
context's one prompt cache (long prompts) or get a copy of it in their own cache (short prompts,
fewer kernels per step); see model.decode_shared and `SamplingConfig.cache_layout`.

Shapes: b contexts, g samples per context, r = b * g sample rows (row i * g + j is sample j of
context i), p prompt tokens (left padded), n max_new_tokens, v vocab.

Randomness: step t of row i draws one uniform from fold_in(fold_in(rng, t), i) and inverts the
CDF of the (filtered) temperature-scaled softmax, so the tokens depend only on (rng, row, step)
and not on how the rows are split over devices.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rpt_jax import model, sharding


# On an H200 (Qwen2.5-0.5B shape, bf16, 256 rows, prompt 128, G=8) the shared layout's extra
# attention kernels cost ~0.3 ms a step more than the prompt bytes it saves; the bytes saved
# grow with the prompt, and break even near 450 prompt tokens.
SHARED_MIN_PROMPT = 512


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Hashable sampling settings (a static jit argument)."""
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False
    max_new_tokens: int = 16
    stop_ids: tuple[int, ...] = ()
    cache_dtype: str = "bfloat16"
    # "shared": one prompt cache per context, read once per step for its g samples;
    # "per_sample": the prompt copied into every sample's cache (fewer kernels per step);
    # "auto": shared when g > 1 and the prompt has >= SHARED_MIN_PROMPT tokens.
    cache_layout: str = "auto"
    # prefill the prompts in this many sequential slices of rows (lax.map): bounds the prefill
    # activations (every layer's k, v and one layer's [rows, heads, p, p] scores) for long prompts
    prefill_chunks: int = 1
    # all-gather the (compute-dtype) decoding weights over the fsdp axis once per call instead
    # of once per decode step; costs one copy of the weights per fsdp shard (see memory_bytes)
    gather_weights: bool = True

    def __post_init__(self):
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_samples={self.num_samples} and max_new_tokens="
                             f"{self.max_new_tokens} must be positive")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive (or greedy=True)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if self.prefill_chunks < 1:
            raise ValueError(f"prefill_chunks={self.prefill_chunks} must be >= 1")
        if self.cache_layout not in ("auto", "shared", "per_sample"):
            raise ValueError(f"cache_layout={self.cache_layout!r} is not auto/shared/per_sample")

    def shared_prompt(self, prompt_len: int) -> bool:
        """Whether the g samples of a context read one prompt cache (see cache_layout)."""
        if self.cache_layout == "auto":
            return self.num_samples > 1 and prompt_len >= SHARED_MIN_PROMPT
        return self.cache_layout == "shared"

    @classmethod
    def from_config(cls, sampling_config, stop_ids=()) -> "SamplingConfig":
        """From the `sampling` section of an rpt_jax config plus the tokenizer's eos / stop ids."""
        c = sampling_config
        tuning = {k: c[k] for k in ("cache_layout", "prefill_chunks") if k in c}  # optional keys
        return cls(num_samples=int(c.num_samples), temperature=float(c.temperature),
                   top_k=int(c.top_k), top_p=float(c.top_p), greedy=bool(c.greedy),
                   max_new_tokens=int(c.max_new_tokens),
                   stop_ids=tuple(sorted({int(s) for s in stop_ids})),
                   cache_dtype=str(c.cache_dtype), **tuning)


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [r, n] int32; pad_id after a row's end
    logprobs: jax.Array  # [r, n] float32 log_softmax(logits / T)[token]; 0 after the end
    lengths: jax.Array  # [r] int32 tokens generated, the stop token included
    finished: jax.Array  # [r] bool: True if a stop id was produced, False if truncated


# ----------------------------------------------------------------------------- token choice

def _filtered_logits(scaled, top_k: int, top_p: float):
    """Mask (to -inf) the tokens that top-k, then top-p on the remaining distribution, remove.

    scaled [r, v] float32 logits / T. Top-p keeps the smallest set of the most likely tokens whose
    probability reaches top_p (the most likely token always stays), as transformers does.
    """
    neg = -jnp.inf
    if top_k and top_k < scaled.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, neg, scaled)
    if top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(scaled.shape[0])[:, None], order].set(keep_sorted)
        scaled = jnp.where(keep, scaled, neg)
    return scaled


def _chunk(v: int) -> int:
    """The largest divisor of v that is at most sqrt(v): the token chunk of `_inverse_cdf`."""
    return max(c for c in range(1, int(v ** 0.5) + 1) if v % c == 0)


def _first_above(cum, target):
    """Per row, the first index whose cumulative mass exceeds target, kept on a massive entry.

    cum [r, n] non-decreasing; target [r]. Rounding can put target at or past the total; the
    index is then clamped to the last entry with mass, so an excluded token is never chosen.
    """
    n = cum.shape[-1]
    idx = jnp.sum(cum <= target[:, None], axis=-1)
    has_mass = jnp.diff(cum, axis=-1, prepend=0.0) > 0
    last = n - 1 - jnp.argmax(has_mass[:, ::-1], axis=-1)
    return jnp.minimum(idx, last)


def _inverse_cdf(weights_fn, r, v, u):
    """Sample token i with probability w_i / sum(w) from u [r] uniform in [0, 1).

    weights_fn(chunk_index or None) gives the unnormalised weights [r, v] (None) or those of one
    chunk per row [r, c]. Two levels (chunk masses, then tokens of the chosen chunk) so the
    [r, v] array is read once, by one reduction, instead of drawing v random numbers per row.
    Returns (tokens [r] int32, total mass [r]).
    """
    c = _chunk(v)
    mass = weights_fn(None).reshape(r, v // c, c).sum(-1)  # [r, v/c]
    # a vocab split over the tensor axis splits the chunks too; gather the small chunk masses
    # once so the scans below run locally ("length" is a logical axis that is never split)
    mass = sharding.constrain(mass, ("batch", "length"))
    cum = jnp.cumsum(mass, axis=-1)
    total = cum[:, -1]
    target = u * total
    j = _first_above(cum, target)
    before = jnp.where(j > 0, jnp.take_along_axis(cum, jnp.maximum(j - 1, 0)[:, None], 1)[:, 0],
                       0.0)
    within = jnp.cumsum(weights_fn(j), axis=-1)  # [r, c]
    i = _first_above(within, target - before)
    return (j * c + i).astype(jnp.int32), total


def choose_tokens(logits, rng, step, rows, cfg: SamplingConfig):
    """Pick one token per row. logits [r, v] float32; rows [r] global row ids.

    Sampling draws one uniform per row from fold_in(fold_in(rng, step), row), so a row's token
    does not depend on how rows are split over devices. Returns (tokens [r] int32,
    log_softmax(logits / T)[token] [r] float32, under the full, unfiltered distribution).
    """
    r, v = logits.shape
    scaled = logits / cfg.temperature if cfg.temperature > 0 else logits
    top = jnp.max(scaled, axis=-1, keepdims=True)
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        log_norm = None
    else:
        filtered = _filtered_logits(scaled, cfg.top_k, cfg.top_p)
        c = _chunk(v)

        def weights_fn(j):  # exp(filtered - max): the max of scaled is the max of filtered too
            if j is None:
                return jnp.exp(filtered - top)
            chunk = jnp.take_along_axis(filtered.reshape(r, v // c, c), j[:, None, None], 1)
            return jnp.exp(chunk[:, 0] - top)

        step_key = jax.random.fold_in(rng, step)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, rows)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
        tokens, total = _inverse_cdf(weights_fn, r, v, u)
        unfiltered = not cfg.top_k and cfg.top_p >= 1.0
        log_norm = top[:, 0] + jnp.log(total) if unfiltered else None
    if log_norm is None:
        log_norm = top[:, 0] + jnp.log(jnp.sum(jnp.exp(scaled - top), axis=-1))
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - log_norm


# ----------------------------------------------------------------------------- the sampler

CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # [r, k, s, e]


def prepare(params, prompt_tokens, prompt_mask, rng, model_cfg: model.ModelConfig,
            sampling_cfg: SamplingConfig, pad_id: int = 0):
    """Everything before the decode loop: prefill, caches, token 0. Returns (context, state).

    context holds what the loop only reads (decoding weights, prompt cache, positions); state
    what it updates (per-sample cache, output buffers, done flags, step t).
    """
    cfg = sampling_cfg
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask "
                         f"{prompt_mask.shape} must both be [batch, prompt_len]")
    b, p = prompt_tokens.shape
    g, n = cfg.num_samples, cfg.max_new_tokens
    r = b * g
    mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)

    first_logits, prompt_cache = _prefill(params, prompt_tokens, positions, mask, model_cfg, cfg)
    # the per-sample cache holds every fed token: all but the last sampled one
    if cfg.shared_prompt(p):
        cache = model.init_response_cache(model_cfg, r, max(n - 1, 1), cfg.cache_dtype)
        offset = 0
    else:
        prefix = jax.tree.map(lambda x: jnp.repeat(x, g, axis=0), prompt_cache)
        cache = model.init_response_cache(model_cfg, r, p + max(n - 1, 1), cfg.cache_dtype,
                                          prefix)
        prompt_cache, offset = None, p
    cache = {"k": tuple(sharding.constrain(c, CACHE_AXES) for c in cache["k"]),
             "v": tuple(sharding.constrain(c, CACHE_AXES) for c in cache["v"]),
             "valid": cache["valid"]}
    context = dict(weights=_decoding_weights(params, model_cfg, cfg), prompt_cache=prompt_cache,
                   slot_offset=offset, rng=rng,
                   row_pos=jnp.repeat(mask.sum(axis=1), g))  # position of response token 0
    state = dict(tokens=jnp.full((r, n), pad_id, jnp.int32), logprobs=jnp.zeros((r, n)),
                 lengths=jnp.zeros((r,), jnp.int32), done=jnp.zeros((r,), bool),
                 stopped=jnp.zeros((r,), bool), last=jnp.zeros((r,), jnp.int32),
                 t=jnp.zeros((), jnp.int32), cache=cache)
    state = _record(state, jnp.repeat(first_logits, g, axis=0), rng, cfg, pad_id)
    return context, state


def _decoding_weights(params, model_cfg, cfg: SamplingConfig):
    """model.decoding_weights, split like the params, or with the fsdp axis gathered."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    unsplit = {"embed": "act_embed"} if cfg.gather_weights else {}  # act_embed: never split
    axes = jax.tree.map(lambda a: tuple(unsplit.get(n, n) for n in a),
                        model.decoding_axes(model_cfg), is_leaf=is_axes)
    return jax.tree.map(lambda a, w: sharding.constrain(w, a), axes,
                        model.decoding_weights(params, model_cfg), is_leaf=is_axes)


def _prefill(params, tokens, positions, mask, model_cfg, cfg: SamplingConfig):
    """model.prefill_prompt over all rows, or over cfg.prefill_chunks slices of rows in turn.

    Slice i holds rows i, i + c, i + 2c, ... (c = prefill_chunks), so with the batch split over
    devices in contiguous blocks every device keeps working on its own rows.
    """
    b, c = tokens.shape[0], cfg.prefill_chunks
    if c == 1:
        return model.prefill_prompt(params, tokens, model_cfg, positions, mask, cfg.cache_dtype)
    if b % c:
        raise ValueError(f"prompt batch {b} is not divisible by prefill_chunks={c}")
    split = lambda x: jnp.swapaxes(x.reshape((b // c, c) + x.shape[1:]), 0, 1)  # noqa: E731
    merge = lambda x: jnp.swapaxes(x, 0, 1).reshape((b,) + x.shape[2:])  # noqa: E731
    out = jax.lax.map(lambda a: model.prefill_prompt(params, a[0], model_cfg, a[1], a[2],
                                                     cfg.cache_dtype),
                      (split(tokens), split(positions), split(mask)))
    return jax.tree.map(merge, out)


def _record(state, logits, rng, cfg: SamplingConfig, pad_id):
    """Choose the tokens of step t from logits [r, v]; rows already done get pad_id, logprob 0."""
    t = state["t"]
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)
    tok, lp = choose_tokens(logits, rng, t, rows, cfg)
    done = state["done"]
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    stop_ids = jnp.asarray(cfg.stop_ids if cfg.stop_ids else (-1,), jnp.int32)
    stopped = ~done & jnp.isin(tok, stop_ids)
    return dict(state,
                tokens=jax.lax.dynamic_update_slice(state["tokens"], tok[:, None], (0, t)),
                logprobs=jax.lax.dynamic_update_slice(state["logprobs"], lp[:, None], (0, t)),
                lengths=state["lengths"] + (~done).astype(jnp.int32),
                done=done | stopped, stopped=state["stopped"] | stopped, last=tok, t=t + 1)


def decode_loop(context, state, model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig,
                pad_id: int = 0) -> SampleOutput:
    """The `lax.while_loop` of decode steps; exits when every row is done or n tokens exist."""
    cfg = sampling_cfg

    def cond(state):
        return (state["t"] < cfg.max_new_tokens) & ~jnp.all(state["done"])

    def body(state):
        t = state["t"]  # feed token t-1 (response slot t-1), choose token t
        logits, cache = model.decode_shared(
            context["weights"], state["last"], context["row_pos"] + t - 1,
            context["prompt_cache"], state["cache"], context["slot_offset"] + t - 1, model_cfg)
        return _record(dict(state, cache=cache), logits, context["rng"], cfg, pad_id)

    state = jax.lax.while_loop(cond, body, state)
    return SampleOutput(state["tokens"], state["logprobs"], state["lengths"], state["stopped"])


def sample(params, prompt_tokens, prompt_mask, rng, model_cfg: model.ModelConfig,
           sampling_cfg: SamplingConfig, pad_id: int = 0) -> SampleOutput:
    """Sample g continuations of every prompt (traceable; `make_sampler` jits it on a mesh).

    prompt_tokens, prompt_mask [b, p]: left padded (mask 0 = pad, the last column real in every
    row); positions count from each row's first real token. rng: a PRNG key.
    """
    context, state = prepare(params, prompt_tokens, prompt_mask, rng, model_cfg, sampling_cfg,
                             pad_id)
    return decode_loop(context, state, model_cfg, sampling_cfg, pad_id)


def make_sampler(mesh, model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig,
                 param_shardings, pad_id: int = 0):
    """`sample` jitted on `mesh`: (params, prompt_tokens, prompt_mask, rng) -> SampleOutput.

    Params keep `param_shardings` (the training layout); prompts and outputs are split over the
    data axes. One compile per prompt shape (the caller pads to a few buckets); before it, the
    memory estimate is checked against the devices' reported memory (`check_memory`). Nothing
    is donated: no input matches an output's shape, and the caches live and are updated in
    place inside the one compiled call.
    """
    rows = sharding.batch_sharding(mesh, 1)
    mat = sharding.batch_sharding(mesh, 2)
    repl = sharding.replicated(mesh)

    def fn(params, prompt_tokens, prompt_mask, rng):
        return sample(params, prompt_tokens, prompt_mask, rng, model_cfg, sampling_cfg, pad_id)

    jitted = jax.jit(fn, in_shardings=(param_shardings, mat, mat, repl),
                     out_shardings=SampleOutput(mat, mat, rows, rows))

    checked = set()

    def run(params, prompt_tokens, prompt_mask, rng):
        shape = tuple(prompt_tokens.shape)
        if shape not in checked:  # once per prompt bucket, before its compile
            split = mesh.shape["data"] * mesh.shape["fsdp"]
            if shape[0] % split:
                raise ValueError(f"prompt batch {shape[0]} is not divisible by the mesh's data "
                                 f"axes (data*fsdp={split})")
            available = device_bytes(mesh)
            if available is not None:
                check_memory(model_cfg, sampling_cfg, shape[0], shape[1], available,
                             mesh.shape["fsdp"])
            checked.add(shape)
        with jax.set_mesh(mesh):
            return jitted(params, prompt_tokens, prompt_mask, rng)

    run.jitted = jitted
    return run


# ----------------------------------------------------------------------------- memory

def memory_bytes(model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig, batch: int,
                 prompt_len: int, fsdp: int = 1) -> dict:
    """Bytes the sampler holds at once (all devices together), by part. batch = contexts;
    fsdp: size of the mesh's fsdp axis (gather_weights keeps a weight copy per fsdp shard)."""
    m, s = model_cfg, sampling_cfg
    n_params = model.num_params(m)
    compute_b = jnp.dtype(m.dtype).itemsize
    rows = batch * s.num_samples
    per_slot = 2 * m.num_layers * m.num_kv_heads * m.head_dim * jnp.dtype(s.cache_dtype).itemsize
    sample_slots = s.max_new_tokens + (0 if s.shared_prompt(prompt_len) else prompt_len)
    return {
        "params": n_params * jnp.dtype(m.param_dtype).itemsize,
        "decoding weights (compute-dtype copy)": n_params * compute_b * (
            fsdp if s.gather_weights else 1),
        "prompt KV cache": batch * prompt_len * per_slot,
        "per-sample KV cache": rows * sample_slots * per_slot,
        # prefill of batch / prefill_chunks rows at a time: every layer's k, v (scan outputs),
        # one layer's activations and, without a fused attention kernel, its scores
        "prefill activations": -(-batch // s.prefill_chunks) * prompt_len * (
            (2 * m.num_layers * m.num_kv_heads * m.head_dim + 4 * m.hidden_size
             + 3 * m.mlp_dim) * compute_b
            + (m.num_heads * prompt_len * 4 if m.attention != "cudnn" else 0)),
        "logits and sampling buffers": rows * m.vocab_size * 4 * 3,
        "outputs": rows * s.max_new_tokens * 8,
    }


def check_memory(model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig, batch: int,
                 prompt_len: int, bytes_available: int, fsdp: int = 1) -> int:
    """Raise ValueError before compiling when sampling cannot fit in `bytes_available`.

    batch: contexts (rows = batch * num_samples); bytes_available: the memory of all devices
    the sampler runs on, together (the data are split evenly). Returns the estimate in bytes.
    """
    parts = memory_bytes(model_cfg, sampling_cfg, batch, prompt_len, fsdp)
    total = int(sum(parts.values()))
    if total > bytes_available:
        detail = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in parts.items())
        raise ValueError(
            f"sampling batch={batch} x num_samples={sampling_cfg.num_samples}, prompt_len="
            f"{prompt_len}, max_new_tokens={sampling_cfg.max_new_tokens} needs about "
            f"{total / 2**30:.2f} GiB but {bytes_available / 2**30:.2f} GiB are available "
            f"({detail}); lower data.batch_size, sampling.num_samples, "
            f"sampling.max_new_tokens or the prompt bucket, or use a bf16 cache_dtype")
    return total


def device_bytes(mesh) -> int | None:
    """Memory of the mesh's devices together, or None where the backend does not report it."""
    total = 0
    for d in mesh.devices.flat:
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        total += stats["bytes_limit"]
    return total
