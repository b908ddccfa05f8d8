"""Jitted sampling of G continuations per prompt under a device mesh.

One prefill per prefix row (a context, or a whole document for all of its contexts: `Prompts`),
then `lax.while_loop`s of KV-cached decode steps over all b * g samples that exit as soon as
every sample has stopped. The rows of a prefix row either read its one prompt cache (long
prompts, documents) or get a copy of it in their own cache (short prompts, fewer kernels per
step); see model.decode_step, `SamplingConfig.cache_layout` and `cache_blocks`.

Shapes: b contexts, g samples per context, r = b * g sample rows (row i * g + j is sample j of
context i), p prompt tokens (left padded), n max_new_tokens, v vocab.

Randomness: step t of row i draws one uniform from fold_in(fold_in(rng, t), i) and inverts the
CDF of the (filtered) temperature-scaled softmax, so the tokens depend only on (rng, row, step)
and not on how the rows are split over devices.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rpt_jax import decode_attention, model, sharding

log = logging.getLogger(__name__)


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
    # "shared": one prompt cache per prefix row, read once per step for the rows it serves;
    # "per_sample": the prompt copied into every sample's cache (fewer kernels per step);
    # "auto": shared for document-grouped prompts, and when g > 1 and the prompt has
    # >= SHARED_MIN_PROMPT tokens.
    cache_layout: str = "auto"
    # prefill the prompts in this many sequential slices of rows (lax.map): bounds the prefill
    # activations (every layer's k, v and one layer's [rows, heads, p, p] scores) for long prompts
    prefill_chunks: int = 1
    # all-gather the (compute-dtype) decoding weights over the fsdp axis once per call instead
    # of once per decode step; costs one copy of the weights per fsdp shard (see memory_bytes)
    gather_weights: bool = True
    # the per-sample cache in this many blocks, one decode loop each: the steps of block i read
    # blocks 0..i only, so long responses read about (k + 1) / 2k of the cache a step instead
    # of all of it, for a few more kernels per step and k loops to compile
    cache_blocks: int = 1
    # decode attention: "xla" (einsums and a softmax, any backend) or "pallas" (one fused
    # kernel per cache part and layer that reads only the slots written so far; GPU, and
    # Pallas' interpreter on CPU for tests)
    attention: str = "xla"
    # continuous batching (rpt_jax.continuous): decode the rows through this many lanes, a
    # finished row's lane taking the next row (0: all rows at once; with the shared layout and
    # G > 1, lanes come in slots of G serving one context); `refill` free slots per device
    # (0: an eighth of them) are refilled together; one cache block
    lanes: int = 0
    refill: int = 0
    # GPU matmuls: "cublas" (library GEMMs), "xla" (XLA's choice: Triton GEMM fusions, which at
    # decode's few rows split K into float32 partials that the next fusions re-read) or "auto":
    # cublas with the pallas attention (1.11-1.13x the new tokens/s on an H100 at the
    # Qwen2.5-0.5B shape), xla with the einsum attention (whose einsums as cuBLAS calls made a
    # step 44% longer); BENCHMARKS.md. No effect on other backends.
    gemm: str = "auto"
    # the decode step's down projection as split_down GEMMs over slices of mlp_dim, summed in
    # float32 with the residual: at decode's few rows its 896 outputs (Qwen2.5-0.5B) make
    # about 14 output tiles for an H100's 132 SMs, each looping over all 4864 of K; split_down
    # times as many tiles, for one more fusion a layer (not yet timed: gpu_sampler_runs.sh 8)
    split_down: int = 1

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
        if self.prefill_chunks < 1 or self.cache_blocks < 1:
            raise ValueError(f"prefill_chunks={self.prefill_chunks} and cache_blocks="
                             f"{self.cache_blocks} must be >= 1")
        if self.cache_layout not in ("auto", "shared", "per_sample"):
            raise ValueError(f"cache_layout={self.cache_layout!r} is not auto/shared/per_sample")
        if self.attention not in ("xla", "pallas"):
            raise ValueError(f"attention={self.attention!r} is not xla/pallas")
        if self.cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"cache_dtype={self.cache_dtype!r} is not float32/bfloat16/float16")
        if self.gemm not in ("auto", "cublas", "xla"):
            raise ValueError(f"gemm={self.gemm!r} is not auto/cublas/xla")
        if self.split_down < 1:
            raise ValueError(f"split_down={self.split_down} must be >= 1")
        if self.lanes < 0 or self.refill < 0:
            raise ValueError(f"lanes={self.lanes} and refill={self.refill} must be >= 0")
        if self.lanes and self.cache_blocks != 1:
            raise ValueError(f"lanes={self.lanes} (continuous batching) keeps each lane's "
                             f"response in one block: it needs cache_blocks=1 (got "
                             f"{self.cache_blocks})")

    def compiler_options(self, platform: str) -> dict:
        """XLA options of the sampler's compile on `platform` (a jax Device.platform)."""
        cublas = self.gemm == "cublas" or (self.gemm == "auto" and self.attention == "pallas")
        return {"xla_gpu_enable_triton_gemm": False} if cublas and platform == "gpu" else {}

    @property
    def slot_multiple(self) -> int:
        """Every cache's slots are a multiple of this (the pallas kernel's block of slots)."""
        return decode_attention.BLOCK_K if self.attention == "pallas" else 1

    def shared_prompt(self, prompt_len: int, contexts_per_row: int = 1) -> bool:
        """Whether the rows of a prefix row read one prompt cache (see cache_layout)."""
        if self.cache_layout == "auto":
            return contexts_per_row > 1 or (self.num_samples > 1
                                            and prompt_len >= SHARED_MIN_PROMPT)
        return self.cache_layout == "shared"

    @classmethod
    def from_config(cls, sampling_config, stop_ids=()) -> "SamplingConfig":
        """From the `sampling` section of an rpt_jax config plus the tokenizer's eos / stop ids."""
        c = sampling_config
        tuning = {k: c[k] for k in ("cache_layout", "prefill_chunks", "cache_blocks", "attention",
                                    "lanes", "refill", "gemm", "split_down")
                  if k in c}  # optional keys
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


def _softmax_stats(x, c: int):
    """(max [r], mass [r, v / c]) of x [r, v]: the row max and, per chunk of c tokens, the sum of
    exp(x - max) (0 for a chunk of -inf). A NaN in x makes its row's stats NaN.

    On GPUs one pass over x (`_stats_one_pass`, one kernel); elsewhere two reductions (max, then
    the sums): XLA:CPU runs the variadic reduction about 16x slower.
    """
    one_pass = functools.partial(_stats_one_pass, c=c)
    return jax.lax.platform_dependent(x, cuda=one_pass, rocm=one_pass,
                                      default=functools.partial(_stats_two_pass, c=c))


def _stats_two_pass(x, c: int):
    """`_softmax_stats` by a max and then the chunk sums."""
    r, v = x.shape
    top = jnp.max(x, axis=1)
    return top, jnp.exp(x - top[:, None]).reshape(r, v // c, c).sum(-1)


def _stats_one_pass(x, c: int):
    """`_softmax_stats` by one variadic reduction that keeps a running (max, sum of
    exp(x - max)) per chunk, reading x once."""
    r, v = x.shape
    chunks = x.reshape(r, v // c, c)
    m, s = jax.lax.reduce((chunks, jnp.ones_like(chunks)),
                          (jnp.float32(-jnp.inf), jnp.float32(0.0)), _online_softmax, (2,))
    top = jnp.max(m, axis=1)
    return top, s * jnp.exp(m - top[:, None])  # a chunk of -inf: 0 * 0


def _online_softmax(a, b):
    """Merge two (max, sum of exp(x - max)) pairs with one exp; -inf maxes (nothing seen) give
    weight 0 instead of exp(-inf - -inf) = NaN."""
    (ma, sa), (mb, sb) = a, b
    m = jnp.maximum(ma, mb)
    e = jnp.exp(jnp.where(m == -jnp.inf, -jnp.inf, jnp.minimum(ma, mb) - m))
    return m, jnp.where(ma >= mb, sa + sb * e, sa * e + sb)


def _inverse_cdf(mass, weights_fn, u):
    """Sample token i with probability w_i / sum(w) from u [r] uniform in [0, 1).

    mass [r, v / c]: the weights' sums by chunk of c tokens; weights_fn(j) gives the weights
    [r, c] of chunk j [r] of each row. Two levels (chunks, then the tokens of the chosen chunk)
    so the [r, v] array is read once, by the reduction that gave `mass`, instead of drawing v
    random numbers per row. Returns (tokens [r] int32, total mass [r]).
    """
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
    return (j * within.shape[-1] + i).astype(jnp.int32), total


def choose_tokens(logits, rng, step, rows, cfg: SamplingConfig):
    """Pick one token per row. logits [r, v] float32; rows [r] global row ids; step: the
    sampling step, a scalar or each row's own [r].

    Sampling draws one uniform per row from fold_in(fold_in(rng, step), row), so a row's token
    does not depend on how rows are split over devices or batched with others. Returns
    (tokens [r] int32, log_softmax(logits / T)[token] [r] float32, under the full, unfiltered
    distribution; greedy with T <= 0: log_softmax(logits), T = 1).
    """
    r, v = logits.shape
    c = _chunk(v)
    scaled = logits / cfg.temperature if cfg.temperature > 0 else logits
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        top, mass = _softmax_stats(scaled, c)
        log_norm = top + jnp.log(mass.sum(-1))
    else:
        filtered = _filtered_logits(scaled, cfg.top_k, cfg.top_p)
        top, mass = _softmax_stats(filtered, c)  # the max of scaled is the max of filtered too

        def weights_fn(j):  # exp(filtered - max) of chunk j of each row
            chunk = jnp.take_along_axis(filtered.reshape(r, v // c, c), j[:, None, None], 1)
            return jnp.exp(chunk[:, 0] - top[:, None])

        steps = jnp.broadcast_to(step, rows.shape)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(rng, s), i))(
            steps, rows)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
        tokens, total = _inverse_cdf(mass, weights_fn, u)
        if not cfg.top_k and cfg.top_p >= 1.0:  # unfiltered: the sampling mass is the norm
            log_norm = top + jnp.log(total)
        else:
            top, mass = _softmax_stats(scaled, c)
            log_norm = top + jnp.log(mass.sum(-1))
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - log_norm


# ----------------------------------------------------------------------------- the sampler

CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # [r, k, s, e]


class Prompts(NamedTuple):
    """The prompts of b contexts as D prefix rows that m = b / D contexts each read in part.

    tokens, mask [D, L]: prefix rows (mask 0 = padding, anywhere); positions count a row's real
    tokens from 0. visible [b] int32: context i reads slots [0, visible[i]) of row i // m.
    tail [b, T] int32: the rest of context i's prompt, all real tokens, fed one per decode step.
    visible = tail = None: plain left-padded prompts [b, L] (m = 1; the last column, real in
    every row, is the tail). contexts.make_batch's doc_* fields give one row per document
    (`from_batch`), so a document is prefilled once for all of its contexts.
    """
    tokens: jax.Array
    mask: jax.Array
    visible: jax.Array | None = None
    tail: jax.Array | None = None

    @classmethod
    def from_batch(cls, batch: dict) -> "Prompts":
        """The document-grouped fields of a contexts batch if it has them, else its prompts."""
        if "doc_tokens" in batch:
            return cls(batch["doc_tokens"], batch["doc_mask"], batch["doc_visible"],
                       batch["tail_tokens"])
        return cls(batch["prompt_tokens"], batch["prompt_mask"])

    def split(self) -> "Prompts":
        """Plain prompts as prefix rows plus a one-token tail (traceable); others unchanged."""
        if self.visible is not None:
            return self
        b, p = self.tokens.shape
        return Prompts(self.tokens[:, :-1], self.mask[:, :-1],
                       jnp.full((b,), p - 1, jnp.int32), self.tokens[:, -1:])

    def check(self) -> tuple[int, int, int, int]:
        """Raise ValueError on inconsistent shapes; return (D, L, b, T) of the split form."""
        if self.tokens.ndim != 2 or self.tokens.shape != self.mask.shape:
            raise ValueError(f"prompt tokens {self.tokens.shape} and mask {self.mask.shape} "
                             f"must both be [rows, length]")
        d, p = self.tokens.shape
        if self.visible is None:
            if p < 2:
                raise ValueError(f"prompts [{d}, {p}] need a width of at least 2")
            return d, p - 1, d, 1
        if self.tail is None:
            raise ValueError("prompts with `visible` need a `tail` [b, T] (T >= 1)")
        b = self.visible.shape[0]
        if (self.visible.ndim != 1 or self.tail.ndim != 2 or self.tail.shape[0] != b or b % d
                or self.tail.shape[1] < 1):
            raise ValueError(f"visible {self.visible.shape} and tail {self.tail.shape} must be "
                             f"[b] and [b, T] (T >= 1) with b a multiple of the {d} prefix rows")
        return d, p, b, self.tail.shape[1]


def prepare(params, prompts: Prompts, rng, model_cfg: model.ModelConfig,
            sampling_cfg: SamplingConfig, pad_id: int = 0):
    """Everything before the decode loop. Returns (context, state).

    Prefills the prefix rows, lays out the caches, then feeds all but the last tail token (one
    decode step each). context holds what the loop only reads (decoding weights, prompt cache,
    positions, block layout); state what it updates (the per-sample cache blocks, output
    buffers, done flags, step t).

    Slots: fed token u (u < T - 1: tail token u; u = T - 1 + t: the token fed at decode step t)
    has position row_pos + u and goes to block u // c at index u % c (plus the prompt copy's
    length in block 0 with the per-sample layout), c = ceil((T - 1 + n) / cache_blocks).
    """
    cfg = sampling_cfg
    d, L, b, T = prompts.check()
    prompts = prompts.split()
    g, n = cfg.num_samples, cfg.max_new_tokens
    r = b * g
    fan = r // d  # rows reading one prefix row
    mask, prompt_cache = _prefill_prompts(params, prompts, model_cfg, cfg)
    visible = prompts.visible.astype(jnp.int32)  # [b]
    row_pos = _row_positions(mask, visible, b, g)
    visible = jnp.repeat(visible, g)  # [r]
    tail = jnp.repeat(prompts.tail.astype(jnp.int32), g, axis=0)  # [r, T]
    c = -(-(T - 1 + n) // cfg.cache_blocks)  # fed tokens: all but the last sampled one
    if cfg.shared_prompt(L, b // d):
        frozen = [dict(_pad_slots(prompt_cache, cfg.slot_multiple),
                       visible=visible.reshape(d, fan))]
        prefix = None
    else:  # the prompt copied into each sample's block 0
        frozen = []
        prefix = jax.tree.map(lambda x: jnp.repeat(x, fan, axis=0), prompt_cache)
        prefix["valid"] = prefix["valid"] & (jnp.arange(L) < visible[:, None])
    offset = 0 if prefix is None else L
    size = lambda i: _round_up(c + (offset if i == 0 else 0), cfg.slot_multiple)  # noqa: E731
    # allocated once the prefill is done: its activations and these caches are never alive
    # together (XLA's GPU scheduler may otherwise start the caches first; BENCHMARKS.md)
    _, zero = jax.lax.optimization_barrier((prompt_cache, jnp.zeros((), cfg.cache_dtype)))
    blocks = tuple(_constrain_cache(model.init_response_cache(
        model_cfg, r, size(i), cfg.cache_dtype, prefix if i == 0 else None, zero))
        for i in range(cfg.cache_blocks))
    context = dict(weights=_decoding_weights(params, model_cfg, cfg), frozen=frozen, rng=rng,
                   row_pos=row_pos, block_size=c, offset=offset, tail_len=T)
    for i, lo, hi in _segments(c, 0, T - 1):  # the tail but its last token, no sampling
        blocks = jax.lax.fori_loop(
            lo, hi, lambda u, bl, i=i: _feed(context, bl, tail[:, u], u, i, model_cfg, cfg)[1],
            blocks)
    state = dict(tokens=jnp.full((r, n), pad_id, jnp.int32), logprobs=jnp.zeros((r, n)),
                 lengths=jnp.zeros((r,), jnp.int32), done=jnp.zeros((r,), bool),
                 stopped=jnp.zeros((r,), bool), last=tail[:, -1],
                 t=jnp.zeros((), jnp.int32), blocks=blocks)
    return context, state


def _prefill_prompts(params, prompts: Prompts, model_cfg, cfg: SamplingConfig):
    """(int32 mask [D, L], prompt cache) of split Prompts' prefix rows (positions count a row's
    real tokens from 0)."""
    mask = prompts.mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return mask, _prefill(params, prompts.tokens, positions, mask, model_cfg, cfg)


def _row_positions(mask, visible, b: int, g: int):
    """[b * g] position of each row's first tail token: the real prefix tokens its context
    reads (mask [D, L] of the prefix rows, visible [b])."""
    d, L = mask.shape
    seen = jnp.repeat(mask, b // d, axis=0) * (jnp.arange(L) < visible[:, None])
    return jnp.repeat(jnp.sum(seen, axis=1), g)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_slots(cache, multiple: int):
    """A prompt cache with its slots padded (invalid) to a multiple of `multiple`."""
    s = cache["valid"].shape[1]
    extra = _round_up(s, multiple) - s
    if not extra:
        return cache
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0)  # noqa: E731
                                      for a in range(x.ndim)])
    return {"k": tuple(pad(x, 2) for x in cache["k"]), "v": tuple(pad(x, 2) for x in cache["v"]),
            "valid": pad(cache["valid"], 1)}


def _constrain_cache(cache):
    return {"k": tuple(sharding.constrain(x, CACHE_AXES) for x in cache["k"]),
            "v": tuple(sharding.constrain(x, CACHE_AXES) for x in cache["v"]),
            "valid": cache["valid"]}


def _segments(c: int, lo: int, hi: int):
    """(block i, lo_i, hi_i) for the fed-token range [lo, hi) cut at multiples of c."""
    return [(u // c, u, min(hi, (u // c + 1) * c)) for u in range(lo, hi)
            if u == lo or u % c == 0]


def _feed(context, blocks, tokens, u, i: int, model_cfg, cfg: SamplingConfig, active=None):
    """Feed tokens [r] as fed token u into block i (static), reading the prompt cache and
    blocks 0..i-1 (the pallas attention skips the caches of rows not `active`).
    Returns (logits [r, v], blocks)."""
    index = u - i * context["block_size"] + (context["offset"] if i == 0 else 0)
    logits, block = model.decode_step(context["weights"], tokens, context["row_pos"] + u,
                                      context["frozen"] + list(blocks[:i]), blocks[i], index,
                                      model_cfg, cfg.attention, active, cfg.split_down)
    return logits, blocks[:i] + (block,) + blocks[i + 1:]


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
        raise ValueError(f"{b} prompt rows are not divisible by prefill_chunks={c}")
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
    """`lax.while_loop`s of decode steps, one per cache block (its steps read only the blocks
    written so far); each exits when every row is done or n tokens exist. Step t feeds token
    t - 1 (the last tail token at t = 0) and chooses token t."""
    cfg, n = sampling_cfg, sampling_cfg.max_new_tokens
    first = context["tail_len"] - 1  # fed-token index of step 0
    for i, lo, hi in _segments(context["block_size"], first, first + n):

        def cond(state, hi=hi):
            return (state["t"] < hi - first) & ~jnp.all(state["done"])

        def body(state, i=i):
            logits, blocks = _feed(context, state["blocks"], state["last"], first + state["t"],
                                   i, model_cfg, cfg, ~state["done"])
            return _record(dict(state, blocks=blocks), logits, context["rng"], cfg, pad_id)

        state = jax.lax.while_loop(cond, body, state)
    return SampleOutput(state["tokens"], state["logprobs"], state["lengths"], state["stopped"])


def sample(params, prompts: Prompts, rng, model_cfg: model.ModelConfig,
           sampling_cfg: SamplingConfig, pad_id: int = 0) -> SampleOutput:
    """Sample g continuations of every context (traceable; `make_sampler` jits it on a mesh).

    prompts: `Prompts` (plain left-padded prompts [b, p]: Prompts(tokens, mask)); rng: a PRNG
    key. Rows of the output: b * g, row i * g + j is sample j of context i.
    """
    context, state = prepare(params, prompts, rng, model_cfg, sampling_cfg, pad_id)
    return decode_loop(context, state, model_cfg, sampling_cfg, pad_id)


def make_sampler(mesh, model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig,
                 param_shardings, pad_id: int = 0, reserved_bytes: int = 0):
    """`sample` jitted on `mesh`: (params, prompts: Prompts, rng) -> SampleOutput.

    Params keep `param_shardings` (the training layout); prompts and outputs are split over the
    data axes (document-grouped prompts need their prefix rows divisible by data * fsdp, so each
    device holds whole documents). One compile per prompt shape (the caller pads to a few
    buckets); before it, the memory estimate is checked against the devices' reported memory
    (`check_memory`), less `reserved_bytes` (all devices together) that the caller keeps on
    them meanwhile, such as the optimizer state. Nothing is donated: no input matches an
    output's shape, and the caches live and are updated in place inside the one compiled call.
    With sampling_cfg.lanes the rows go through that many lanes instead (`rpt_jax.continuous`).
    """
    platform = mesh.devices.flat[0].platform
    if sampling_cfg.attention == "pallas" and platform == "tpu":
        raise ValueError("sampling.attention='pallas' is a GPU (Triton) kernel; set "
                         "sampling.attention='xla' on TPUs")
    rows = sharding.batch_sharding(mesh, 1)
    mat = sharding.batch_sharding(mesh, 2)
    repl = sharding.replicated(mesh)

    def fn(params, prompts, rng):
        if sampling_cfg.lanes:
            from rpt_jax import continuous  # it builds on this module
            return continuous.sample(params, prompts, rng, model_cfg, sampling_cfg, pad_id,
                                     mesh.shape["data"] * mesh.shape["fsdp"])
        return sample(params, prompts, rng, model_cfg, sampling_cfg, pad_id)

    if sampling_cfg.attention == "pallas" and platform == "cpu":
        log.warning("sampling.attention='pallas' runs in Pallas' interpreter on CPU, many times "
                    "slower than 'xla' (the GPU presets set it; use --config.sampling."
                    "attention=xla on CPU)")
    options = sampling_cfg.compiler_options(platform)
    jitted = jax.jit(fn, in_shardings=(param_shardings, Prompts(mat, mat, rows, mat), repl),
                     out_shardings=SampleOutput(mat, mat, rows, rows), compiler_options=options)

    checked = set()

    def run(params, prompts: Prompts, rng):
        d, L, b, T = prompts.check()
        if (d, L, b, T) not in checked:  # once per prompt bucket, before its compile
            split = mesh.shape["data"] * mesh.shape["fsdp"]
            if d % split:
                raise ValueError(f"{d} prompt rows are not divisible by the mesh's data axes "
                                 f"(data*fsdp={split})")
            available = sharding.device_bytes(mesh)
            if available is not None:
                check_memory(model_cfg, sampling_cfg, b, L, available, mesh.shape["fsdp"],
                             prefix_rows=d, tail_len=T, data=mesh.shape["data"],
                             reserved_bytes=reserved_bytes)
            checked.add((d, L, b, T))
        with jax.set_mesh(mesh):
            return jitted(params, prompts, rng)

    run.jitted = jitted
    return run


# ----------------------------------------------------------------------------- memory

def memory_bytes(model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig, batch: int,
                 prompt_len: int, fsdp: int = 1, prefix_rows: int | None = None,
                 tail_len: int = 1, data: int = 1) -> dict:
    """Bytes the sampler allocates (all devices together), by part; the prefill's activations
    are gone before the per-sample caches and sampling buffers exist (`peak_bytes`). batch =
    contexts b; prompt_len = L and prefix_rows = D (default b) of the prefix rows, tail_len = T
    (Prompts); fsdp, data: sizes of the mesh's axes (the weights are whole on each of `data`
    replicas; gather_weights keeps a decoding copy per fsdp shard too)."""
    m, s = model_cfg, sampling_cfg
    n_params = model.num_params(m)
    compute_b = jnp.dtype(m.dtype).itemsize
    rows = batch * s.num_samples
    prefix_rows = batch if prefix_rows is None else prefix_rows
    per_slot = 2 * m.num_layers * m.num_kv_heads * m.head_dim * jnp.dtype(s.cache_dtype).itemsize
    shared = s.shared_prompt(prompt_len, batch // prefix_rows) and not (
        s.lanes and s.num_samples == 1)  # as continuous.sample decides
    c = -(-(tail_len - 1 + s.max_new_tokens) // s.cache_blocks)  # as in `prepare`
    sample_slots = (_round_up(c + (0 if shared else prompt_len), s.slot_multiple)
                    + (s.cache_blocks - 1) * _round_up(c, s.slot_multiple))
    decoding = s.lanes or rows  # rows decoded at once (continuous batching: the lanes)
    return {
        "params": n_params * jnp.dtype(m.param_dtype).itemsize * data,
        "decoding weights (compute-dtype copy)": n_params * compute_b * data * (
            fsdp if s.gather_weights else 1),
        # every prefix row once, plus each lane slot's copy (continuous batching, shared)
        "prompt KV cache": (prefix_rows + (s.lanes // s.num_samples if shared and s.lanes
                                           else 0)) * _round_up(prompt_len, s.slot_multiple)
                           * per_slot,
        "per-sample KV cache": decoding * sample_slots * per_slot,
        # prefill of batch / prefill_chunks rows at a time: every layer's k, v (scan outputs),
        # one layer's activations and, without a fused attention kernel, its scores
        "prefill activations": -(-prefix_rows // s.prefill_chunks) * prompt_len * (
            (2 * m.num_layers * m.num_kv_heads * m.head_dim + 4 * m.hidden_size
             + 3 * m.mlp_dim) * compute_b
            + (m.num_heads * prompt_len * 4 if m.attention != "cudnn" else 0)),
        "logits and sampling buffers": decoding * m.vocab_size * 4 * 3,
        "outputs": rows * s.max_new_tokens * 8,
    }


PREFILL_PARTS = ("prefill activations",)
DECODE_PARTS = ("per-sample KV cache", "logits and sampling buffers")


def peak_bytes(parts: dict) -> int:
    """The most of `memory_bytes`' parts alive at once: what both phases hold, plus the larger
    of the prefill's and the decode loop's own."""
    phase = lambda names: sum(parts[k] for k in names)  # noqa: E731
    both = sum(v for k, v in parts.items() if k not in PREFILL_PARTS + DECODE_PARTS)
    return int(both + max(phase(PREFILL_PARTS), phase(DECODE_PARTS)))


def check_memory(model_cfg: model.ModelConfig, sampling_cfg: SamplingConfig, batch: int,
                 prompt_len: int, bytes_available: int, fsdp: int = 1,
                 prefix_rows: int | None = None, tail_len: int = 1, data: int = 1,
                 reserved_bytes: int = 0) -> int:
    """Raise ValueError before compiling when sampling cannot fit in `bytes_available`.

    batch: contexts (rows = batch * num_samples); bytes_available: the memory of all devices
    the sampler runs on, together (the data are split evenly), of which the caller keeps
    `reserved_bytes` (the optimizer state); the rest as in `memory_bytes`. Returns the
    estimate in bytes.
    """
    free = bytes_available - reserved_bytes
    def need(cfg):
        return peak_bytes(memory_bytes(model_cfg, cfg, batch, prompt_len, fsdp, prefix_rows,
                                       tail_len, data))

    parts = memory_bytes(model_cfg, sampling_cfg, batch, prompt_len, fsdp, prefix_rows,
                         tail_len, data)
    total = peak_bytes(parts)
    if total > free:
        detail = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in parts.items())
        # the most lanes (continuous batching) that fit, in slots of num_samples lanes on
        # each device of the data axes (what config.validate and continuous.sample accept)
        g, lanes = sampling_cfg.num_samples, 0
        unit = g * data * fsdp
        lo, hi = 1, batch * g // unit
        while lo <= hi:
            mid = (lo + hi) // 2
            cfg = dataclasses.replace(sampling_cfg, lanes=mid * unit, cache_blocks=1)
            if need(cfg) <= free:
                lanes, lo = mid * unit, mid + 1
            else:
                hi = mid - 1
        hint = (f", or decode through sampling.lanes={lanes} (continuous batching, "
                f"cache_blocks=1; a multiple of num_samples x the data axes)"
                if lanes and lanes < (sampling_cfg.lanes or batch * g) else "")
        kept = (f" ({bytes_available / 2**30:.2f} GiB less {reserved_bytes / 2**30:.2f} GiB "
                f"of optimizer state)" if reserved_bytes else "")
        raise ValueError(
            f"sampling batch={batch} x num_samples={sampling_cfg.num_samples}, prompt_len="
            f"{prompt_len}, max_new_tokens={sampling_cfg.max_new_tokens} needs about "
            f"{total / 2**30:.2f} GiB but {free / 2**30:.2f} GiB are available{kept} "
            f"({detail}); lower data.batch_size, sampling.num_samples, "
            f"sampling.max_new_tokens or the prompt bucket, or use a bf16 cache_dtype{hint}")
    return total
