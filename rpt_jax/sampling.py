"""Jitted sampling of G continuations per prompt under a device mesh.

One prefill per context, then a `lax.while_loop` of KV-cached decode steps over all b * g samples
that exits as soon as every sample has stopped. The g samples of a context share that context's
prompt cache; each sample has its own response cache (model.decode_shared).

Shapes: b contexts, g samples per context, r = b * g sample rows (row i * g + j is sample j of
context i), p prompt tokens (left padded), n max_new_tokens, v vocab.

Randomness: step t of row i draws from fold_in(fold_in(rng, t), i), so the tokens depend only on
(rng, row, step) and not on how the rows are sharded over devices.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rpt_jax import model, sharding


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

    @classmethod
    def from_config(cls, sampling_config, stop_ids=()) -> "SamplingConfig":
        """From the `sampling` section of an rpt_jax config plus the tokenizer's eos / stop ids."""
        c = sampling_config
        return cls(num_samples=int(c.num_samples), temperature=float(c.temperature),
                   top_k=int(c.top_k), top_p=float(c.top_p), greedy=bool(c.greedy),
                   max_new_tokens=int(c.max_new_tokens),
                   stop_ids=tuple(sorted({int(s) for s in stop_ids})),
                   cache_dtype=str(c.cache_dtype))


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


def choose_tokens(logits, rng, step, rows, cfg: SamplingConfig):
    """Pick one token per row. logits [r, v] float32; rows [r] global row ids.

    Returns (tokens [r] int32, log_softmax(logits / T)[token] [r] float32).
    """
    scaled = logits / cfg.temperature if cfg.temperature > 0 else logits
    logprobs_all = jax.nn.log_softmax(scaled, axis=-1)
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        filtered = _filtered_logits(scaled, cfg.top_k, cfg.top_p)
        step_key = jax.random.fold_in(rng, step)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, rows)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, filtered.shape[-1:], jnp.float32))(keys)
        tokens = jnp.argmax(filtered + gumbel, axis=-1)  # Gumbel-max = categorical(filtered)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- the sampler

def sample(params, prompt_tokens, prompt_mask, rng, model_cfg: model.ModelConfig,
           sampling_cfg: SamplingConfig, pad_id: int = 0) -> SampleOutput:
    """Sample g continuations of every prompt (traceable; `make_sampler` jits it on a mesh).

    prompt_tokens, prompt_mask [b, p]: left padded (mask 0 = pad, the last column real in every
    row); positions count from each row's first real token. rng: a PRNG key.
    """
    cfg = sampling_cfg
    b, p = prompt_tokens.shape
    g, n = cfg.num_samples, cfg.max_new_tokens
    r = b * g
    mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    prompt_len = mask.sum(axis=1)

    weights = model.decoding_weights(params, model_cfg)
    first_logits, prompt_cache = model.prefill_prompt(
        params, prompt_tokens, model_cfg, positions, mask, cfg.cache_dtype)
    # the response cache holds every fed token: all but the last sampled one
    cache = model.init_response_cache(model_cfg, r, max(n - 1, 1), cfg.cache_dtype)
    cache = jax.tree.map(
        lambda c: sharding.constrain(c, ("batch", "kv_heads", "length", "head_dim")), cache)

    rows = jnp.arange(r, dtype=jnp.int32)
    row_pos = jnp.repeat(prompt_len, g)  # position of response token 0
    stop_ids = jnp.asarray(cfg.stop_ids if cfg.stop_ids else (-1,), jnp.int32)

    def record(state, t, logits):
        tok, lp = choose_tokens(logits, rng, t, rows, cfg)
        done = state["done"]
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        stopped = ~done & jnp.isin(tok, stop_ids)
        return dict(state,
                    tokens=state["tokens"].at[:, t].set(tok),
                    logprobs=state["logprobs"].at[:, t].set(lp),
                    lengths=state["lengths"] + (~done).astype(jnp.int32),
                    done=done | stopped, stopped=state["stopped"] | stopped,
                    last=tok, t=t + 1)

    state = dict(tokens=jnp.full((r, n), pad_id, jnp.int32), logprobs=jnp.zeros((r, n)),
                 lengths=jnp.zeros((r,), jnp.int32), done=jnp.zeros((r,), bool),
                 stopped=jnp.zeros((r,), bool), last=jnp.zeros((r,), jnp.int32),
                 t=jnp.zeros((), jnp.int32), cache=cache)
    state = record(state, 0, jnp.repeat(first_logits, g, axis=0))

    def cond(state):
        return (state["t"] < n) & ~jnp.all(state["done"])

    def body(state):
        t = state["t"]
        logits, new_cache = model.decode_shared(
            weights, state["last"], row_pos + t - 1, prompt_cache, state["cache"], t - 1,
            model_cfg)
        return record(dict(state, cache=new_cache), t, logits)

    state = jax.lax.while_loop(cond, body, state)
    return SampleOutput(state["tokens"], state["logprobs"], state["lengths"], state["stopped"])


def make_sampler(mesh, model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig,
                 param_shardings, pad_id: int = 0):
    """`sample` jitted on `mesh`: (params, prompt_tokens, prompt_mask, rng) -> SampleOutput.

    Params keep `param_shardings` (the training layout); prompts and outputs are split over the
    data axes. One compile per prompt shape (the caller pads to a few buckets).
    """
    rows = sharding.batch_sharding(mesh, 1)
    mat = sharding.batch_sharding(mesh, 2)
    repl = sharding.replicated(mesh)

    def fn(params, prompt_tokens, prompt_mask, rng):
        return sample(params, prompt_tokens, prompt_mask, rng, model_cfg, sampling_cfg, pad_id)

    jitted = jax.jit(fn, in_shardings=(param_shardings, mat, mat, repl),
                     out_shardings=SampleOutput(mat, mat, rows, rows))

    def run(params, prompt_tokens, prompt_mask, rng):
        with jax.set_mesh(mesh):
            return jitted(params, prompt_tokens, prompt_mask, rng)

    run.jitted = jitted
    return run


# ----------------------------------------------------------------------------- memory

def memory_bytes(model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig, batch: int,
                 prompt_len: int) -> dict:
    """Bytes the sampler holds at once (all devices together), by part."""
    m, s = model_cfg, sampling_cfg
    n_params = model.num_params(m)
    param_b = jnp.dtype(m.param_dtype).itemsize
    compute_b = jnp.dtype(m.dtype).itemsize
    cache_b = jnp.dtype(s.cache_dtype).itemsize
    rows = batch * s.num_samples
    per_slot = 2 * m.num_layers * m.num_kv_heads * m.head_dim * cache_b
    parts = {
        "params": n_params * param_b,
        "decoding weights (compute-dtype copy)": n_params * compute_b,
        "prompt KV cache": batch * prompt_len * per_slot,
        "response KV cache": rows * s.max_new_tokens * per_slot,
        # prefill activations: hidden states of every layer's k, v and one layer's scores
        "prefill activations": (batch * prompt_len * (m.num_layers * 2 * m.num_kv_heads
                                                      * m.head_dim + 4 * m.hidden_size
                                                      + 2 * m.mlp_dim) * compute_b
                                + batch * m.num_heads * prompt_len * prompt_len * 4),
        "decode logits and sampling buffers": rows * m.vocab_size * 4 * 4,
        "outputs": rows * s.max_new_tokens * 8,
    }
    return parts


def check_memory(model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig, batch: int,
                 prompt_len: int, bytes_available: int) -> int:
    """Raise ValueError before compiling when sampling cannot fit in `bytes_available`.

    bytes_available: memory of all devices the sampler runs on, together. Returns the estimate.
    """
    parts = memory_bytes(model_cfg, sampling_cfg, batch, prompt_len)
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
