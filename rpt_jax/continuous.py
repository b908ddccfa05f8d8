"""Continuous batching: the sampler's rows decoded through a fixed number of lanes.

RPT's responses range from a few tokens to max_new_tokens, so rows decoded in lockstep wait
for the longest one, and a batch too large for memory runs as several such waits in a row.
With `SamplingConfig.lanes = w`, w lanes decode at once; when a row ends, its lane takes the
next waiting row. Every prefix row is prefilled once up front. A refilled lane copies its
prompt from that cache into its own slots, feeds the tail, then samples. Refills wait until
`refill` lanes of a device are free (or the rows run out): one copy serves several lanes, and a
step with nothing to refill copies nothing.

Rows keep `sampling.sample`'s random draws (keyed by row and the row's own step) and cache
layout (`cache_layout="per_sample"`, one block), so the output is the same as sampling all
rows at once. Lanes and rows are split over the mesh's data axes in contiguous blocks, and a
device's lanes serve only its own rows: refills read only local prompt rows.

Shapes: D devices over the data axes, w lanes (wd = w / D per device), r rows (rd per device),
L prompt slots, T tail tokens, n max_new_tokens, S = L + T - 1 + n lane slots (rounded up).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rpt_jax import model, sampling


def _per_device(x, devices: int):
    """[devices * k, ...] -> [devices, k, ...] (each device's contiguous block)."""
    return x.reshape((devices, x.shape[0] // devices) + x.shape[1:])


def _put(x, lanes, values):
    """x [D, k, ...] with x[i, lanes[i, j]] = values[i, j]; lane indices >= k are dropped."""
    return jax.vmap(lambda a, i, v: a.at[i].set(v, mode="drop"))(x, lanes, values)


def _take(x, index):
    """x [D, k, ...], index [D, j] -> [D, j, ...]."""
    return jax.vmap(lambda a, i: a[i])(x, index)


def sample(params, prompts: sampling.Prompts, rng, model_cfg: model.ModelConfig,
           sampling_cfg: sampling.SamplingConfig, pad_id: int = 0,
           devices: int = 1) -> sampling.SampleOutput:
    """`sampling.sample` through sampling_cfg.lanes lanes (traceable; devices: the mesh's
    data x fsdp size, which must divide the lanes and the prefix rows)."""
    cfg = sampling_cfg
    d, L, b, T = prompts.check()
    prompts = prompts.split()
    g, n, w = cfg.num_samples, cfg.max_new_tokens, cfg.lanes
    r, D = b * g, devices
    if w % D or d % D:
        raise ValueError(f"sampling.lanes={w} and the {d} prefix rows must split over the "
                         f"{D} devices of the data axes")
    wd, rd, m = w // D, r // D, b // d
    k = min(cfg.refill or max(1, wd // 8), wd)
    S = sampling._round_up(L + T - 1 + n, cfg.slot_multiple)

    mask = prompts.mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    prompt = sampling._prefill(params, prompts.tokens, positions, mask, model_cfg, cfg)
    visible = prompts.visible.astype(jnp.int32)
    # what a refill reads, per device: the prompt cache rows, and per row / context the first
    # position, the visible prompt slots and the tail
    src = dict(k=[_per_device(x, D) for x in prompt["k"]],
               v=[_per_device(x, D) for x in prompt["v"]],
               valid=_per_device(prompt["valid"], D),
               row_pos=_per_device(sampling._row_positions(mask, visible, b, g), D),
               visible=_per_device(visible, D),
               tail=_per_device(prompts.tail.astype(jnp.int32), D))
    cache = sampling._constrain_cache(model.init_response_cache(model_cfg, w, S,
                                                                cfg.cache_dtype))
    weights = sampling._decoding_weights(params, model_cfg, cfg)

    def refill(s, most: int):
        """Up to `most` free lanes per device take that device's next rows."""
        free = _per_device(s["row"], D) < 0  # [D, wd]
        take = jnp.minimum(jnp.minimum(free.sum(1), rd - s["next"]), most)  # [D]
        ok = jnp.arange(most)[None] < take[:, None]  # [D, most]
        lanes = jnp.where(ok, jnp.argsort(~free, axis=1, stable=True)[:, :most], wd)
        rows = s["next"][:, None] + jnp.where(ok, jnp.arange(most)[None], 0)  # local ids
        ctx, pre = rows // g, rows // (g * m)
        valid = _take(src["valid"], pre) & (jnp.arange(L) < _take(src["visible"], ctx)[..., None])
        valid = jnp.pad(valid, ((0, 0), (0, 0), (0, S - L)))

        def copy(lane_cache, prompt_cache):  # lane slots < L <- the rows' prompt caches
            rows_cache = _take(prompt_cache, pre).astype(lane_cache.dtype)
            return jax.vmap(lambda a, i, v: a.at[i, :, :L].set(v, mode="drop"))(
                _per_device(lane_cache, D), lanes, rows_cache).reshape(lane_cache.shape)

        lane = lambda x, v: _put(_per_device(x, D), lanes, v).reshape(x.shape)  # noqa: E731
        c = s["cache"]
        c = {"k": tuple(map(copy, c["k"], src["k"])), "v": tuple(map(copy, c["v"], src["v"])),
             "valid": lane(c["valid"], valid)}
        return dict(s, cache=sampling._constrain_cache(c), next=s["next"] + take,
                    row=lane(s["row"], rows), u=lane(s["u"], jnp.zeros_like(rows)),
                    pos=lane(s["pos"], _take(src["row_pos"], rows)),
                    tail=lane(s["tail"], _take(src["tail"], ctx)))

    def step(s):
        busy = s["row"] >= 0
        u = s["u"]
        fed = jnp.where(u < T, jnp.take_along_axis(s["tail"], jnp.minimum(u, T - 1)[:, None],
                                                   1)[:, 0], s["last"])
        logits, c = model.decode_step(weights, fed, s["pos"] + u, [], s["cache"],
                                      jnp.minimum(L + u, S - 1), model_cfg, cfg.attention, busy)
        t = u - (T - 1)  # the row's sampling step
        now = busy & (t >= 0)
        device = jnp.arange(w) // wd
        tok, lp = sampling.choose_tokens(logits, rng, jnp.maximum(t, 0),
                                         device * rd + s["row"], cfg)
        stop_ids = jnp.asarray(cfg.stop_ids if cfg.stop_ids else (-1,), jnp.int32)
        stop = now & jnp.isin(tok, stop_ids)
        at = lambda x: _per_device(x, D)  # noqa: E731
        out_row = at(jnp.where(now, s["row"], rd))  # rd: dropped
        put = lambda o, v: jax.vmap(lambda a, i, j, x: a.at[i, j].set(x, mode="drop"))(  # noqa: E731
            o, out_row, at(jnp.maximum(t, 0)), at(v))
        add = lambda o, v: jax.vmap(lambda a, i, x: a.at[i].add(x, mode="drop"))(  # noqa: E731
            o, out_row, at(v))
        done = now & (stop | (t == n - 1))
        return dict(s, cache=c, tokens=put(s["tokens"], tok), logprobs=put(s["logprobs"], lp),
                    lengths=add(s["lengths"], jnp.ones_like(tok)),
                    stopped=add(s["stopped"], stop.astype(jnp.int32)),
                    row=jnp.where(done, -1, s["row"]), u=jnp.where(busy, u + 1, u), last=tok)

    lane0 = jnp.zeros((w,), jnp.int32)
    state = dict(cache=cache, next=jnp.zeros((D,), jnp.int32), row=lane0 - 1, u=lane0,
                 pos=lane0, last=lane0, tail=jnp.zeros((w, T), jnp.int32),
                 tokens=jnp.full((D, rd, n), pad_id, jnp.int32),
                 logprobs=jnp.zeros((D, rd, n)), lengths=jnp.zeros((D, rd), jnp.int32),
                 stopped=jnp.zeros((D, rd), jnp.int32))

    def waiting(s):  # [D]: rows left, and enough free lanes to refill
        left = rd - s["next"]
        free = (_per_device(s["row"], D) < 0).sum(1)
        return (left > 0) & (free >= jnp.minimum(left, k))

    def until_refill(s):  # decode steps until a device can refill or every lane is free
        return jax.lax.while_loop(lambda s: ~jnp.any(waiting(s)) & jnp.any(s["row"] >= 0),
                                  step, s)

    # The refill sits between step loops, not in a conditional inside one: XLA would copy every
    # cache layer around such a conditional at every step. At the start every lane is free, so
    # the first wd / k rounds only refill.
    state = jax.lax.while_loop(lambda s: jnp.any(s["row"] >= 0) | jnp.any(s["next"] < rd),
                               lambda s: until_refill(refill(s, k)), state)
    flat = lambda x: x.reshape((r,) + x.shape[2:])  # noqa: E731
    return sampling.SampleOutput(flat(state["tokens"]), flat(state["logprobs"]),
                                 flat(state["lengths"]), flat(state["stopped"]) > 0)
