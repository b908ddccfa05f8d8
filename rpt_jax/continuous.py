"""Continuous batching: the sampler's rows decoded through a fixed number of lanes.

RPT's responses range from a few tokens to max_new_tokens, so rows decoded in lockstep wait
for the longest one, and a batch too large for memory runs as several such waits in a row.
With `SamplingConfig.lanes = w`, w lanes decode at once, in slots that each hold one unit of
work; when a slot's unit is done, the slot takes the next one. Every prefix row is prefilled
once up front, and a refilled slot copies its prompt from that cache, feeds the tail, then
samples. Two layouts, as `sampling.sample`'s (`cache_layout`):
- per-sample: a slot is one lane serving one row, with the prompt copied into the lane's
  own cache; lanes never wait for one another;
- shared (long prompts, documents; G > 1): a slot is G lanes serving one context, reading one
  copy of its prompt; the slot is refilled once all G samples are done.
Refills wait until `refill` slots of a device are free (or the work runs out): one refill
round serves several slots, and a step with nothing to refill copies nothing.

Rows keep `sampling.sample`'s random draws (keyed by row and the row's own step), so the
output is the same as sampling all rows at once. Slots and rows are split over the mesh's data
axes in contiguous blocks, and a device's slots serve only its own rows: refills read only
local prompt rows.

Shapes: D devices over the data axes, w lanes in w / u slots of u lanes (u = G shared, else 1),
units (rows or contexts) ud per device, L prompt slots, T tail tokens, n max_new_tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rpt_jax import model, sampling


def _per_device(x, devices: int):
    """[devices * k, ...] -> [devices, k, ...] (each device's contiguous block)."""
    return x.reshape((devices, x.shape[0] // devices) + x.shape[1:])


def _put(x, index, values, devices: int):
    """x [devices * k, ...] with each device's x[index[i, j]] = values[i, j] (index [D, j];
    indices >= k are dropped)."""
    put = jax.vmap(lambda a, i, v: a.at[i].set(v.astype(a.dtype), mode="drop"))
    return put(_per_device(x, devices), index, values).reshape(x.shape)


def _take(x, index):
    """x [D, k, ...], index [D, j] -> [D, j, ...]."""
    return jax.vmap(lambda a, i: a[i])(x, index)


def sample(params, prompts: sampling.Prompts, rng, model_cfg: model.ModelConfig,
           sampling_cfg: sampling.SamplingConfig, pad_id: int = 0,
           devices: int = 1) -> sampling.SampleOutput:
    """`sampling.sample` through sampling_cfg.lanes lanes (traceable; devices: the mesh's
    data x fsdp size, which must divide the slots and the prefix rows)."""
    cfg = sampling_cfg
    d, L, b, T = prompts.check()
    prompts = prompts.split()
    g, n, w = cfg.num_samples, cfg.max_new_tokens, cfg.lanes
    D, m = devices, b // d
    shared = g > 1 and cfg.shared_prompt(L, m)
    u = g if shared else 1  # lanes per slot
    if w % u or (w // u) % D or d % D:
        raise ValueError(f"sampling.lanes={w} must make whole slots of {u} lanes, and the slots "
                         f"and the {d} prefix rows must split over the {D} devices of the data "
                         f"axes")
    slots = w // u
    sd, ud, rd = slots // D, b * g // u // D, b * g // D  # per device: slots, units, rows
    k = min(cfg.refill or max(1, sd // 8), sd)
    Lp = sampling._round_up(L, cfg.slot_multiple)  # a shared slot's prompt slots
    offset = 0 if shared else L  # a lane's first response slot
    S = sampling._round_up(offset + T - 1 + n, cfg.slot_multiple)

    mask, prompt = sampling._prefill_prompts(params, prompts, model_cfg, cfg)
    visible = prompts.visible.astype(jnp.int32)
    # what a refill reads, per device: the prompt cache rows, and per context its first
    # position, its visible prompt slots and its tail
    src = dict(k=[_per_device(x, D) for x in prompt["k"]],
               v=[_per_device(x, D) for x in prompt["v"]],
               valid=_per_device(prompt["valid"], D),
               pos=_per_device(sampling._row_positions(mask, visible, b, 1), D),
               visible=_per_device(visible, D),
               tail=_per_device(prompts.tail.astype(jnp.int32), D))
    lanes_cache = model.init_response_cache(model_cfg, w, S, cfg.cache_dtype)
    prompt_cache = (model.init_response_cache(model_cfg, slots, Lp, cfg.cache_dtype)
                    if shared else None)  # the slots' prompts, read by their u lanes
    weights = sampling._decoding_weights(params, model_cfg, cfg)
    slot_of = jnp.arange(w) // u  # [w]
    member = jnp.arange(w) % u  # a lane's sample within its slot's context

    def refill(s, most: int):
        """Up to `most` free slots per device take that device's next units."""
        free = ~_per_device(s["busy"], D).reshape(D, sd, u).any(-1)  # [D, sd]
        take = jnp.minimum(jnp.minimum(free.sum(1), ud - s["next"]), most)  # [D]
        ok = jnp.arange(most)[None] < take[:, None]  # [D, most]
        chosen = jnp.where(ok, jnp.argsort(~free, axis=1, stable=True)[:, :most], sd)
        units = s["next"][:, None] + jnp.where(ok, jnp.arange(most)[None], 0)  # local ids
        ctx = units // (g // u)
        pre = ctx // m
        seen = _take(src["valid"], pre) & (jnp.arange(L) < _take(src["visible"], ctx)[..., None])
        # the chosen slots' lanes [D, most * u] (dropped with their slot)
        lanes = (chosen[:, :, None] * u + jnp.arange(u)).reshape(D, most * u)

        def copy(target, rows, where):  # slots < L of `rows` of target <- the units' prompts
            put = jax.vmap(lambda a, i, v: a.at[i, :, :L].set(v.astype(a.dtype), mode="drop"))
            return put(_per_device(target, D), where, _take(rows, pre)).reshape(target.shape)

        c, p = s["cache"], s["prompt"]
        if shared:  # the prompt into the slot; the lanes start empty
            p = {"k": tuple(copy(x, y, chosen) for x, y in zip(p["k"], src["k"])),
                 "v": tuple(copy(x, y, chosen) for x, y in zip(p["v"], src["v"])),
                 "valid": _put(p["valid"], chosen, jnp.pad(seen, ((0, 0), (0, 0), (0, Lp - L))),
                               D),
                 "visible": _put(p["visible"], chosen,
                                 jnp.broadcast_to(_take(src["visible"], ctx)[..., None],
                                                  (D, most, u)), D)}
            lane_valid = jnp.zeros((D, most * u, S), bool)
        else:  # the prompt into the lane itself (one lane per slot)
            c = dict(c, k=tuple(copy(x, y, chosen) for x, y in zip(c["k"], src["k"])),
                     v=tuple(copy(x, y, chosen) for x, y in zip(c["v"], src["v"])))
            lane_valid = jnp.pad(seen, ((0, 0), (0, 0), (0, S - L)))
        c = dict(c, valid=_put(c["valid"], lanes, lane_valid, D))
        start = jnp.ones((D, most * u), bool)
        return dict(s, cache=c, prompt=p, next=s["next"] + take,
                    unit=_put(s["unit"], chosen, units, D),
                    busy=_put(s["busy"], lanes, start, D),
                    fed=_put(s["fed"], lanes, jnp.zeros((D, most * u), jnp.int32), D),
                    pos=_put(s["pos"], chosen, _take(src["pos"], ctx), D),
                    tail=_put(s["tail"], chosen, _take(src["tail"], ctx), D))

    def step(s):
        busy, fed_count = s["busy"], s["fed"]
        tail = s["tail"][slot_of]
        fed = jnp.where(fed_count < T, jnp.take_along_axis(
            tail, jnp.minimum(fed_count, T - 1)[:, None], 1)[:, 0], s["last"])
        logits, c = model.decode_step(
            weights, fed, s["pos"][slot_of] + fed_count, [s["prompt"]] if shared else [],
            s["cache"], jnp.minimum(offset + fed_count, S - 1), model_cfg, cfg.attention, busy,
            cfg.split_down)
        t = fed_count - (T - 1)  # the row's sampling step
        now = busy & (t >= 0)
        row = s["unit"][slot_of] * u + member  # local row id on this lane's device
        device = jnp.arange(w) // (w // D)
        tok, lp = sampling.choose_tokens(logits, rng, jnp.maximum(t, 0), device * rd + row, cfg)
        stop_ids = jnp.asarray(cfg.stop_ids if cfg.stop_ids else (-1,), jnp.int32)
        stop = now & jnp.isin(tok, stop_ids)
        at = lambda x: _per_device(x, D)  # noqa: E731
        out_row = at(jnp.where(now, row, rd))  # rd: dropped
        put = lambda o, v: jax.vmap(lambda a, i, j, x: a.at[i, j].set(x, mode="drop"))(  # noqa: E731
            o, out_row, at(jnp.maximum(t, 0)), at(v))
        add = lambda o, v: jax.vmap(lambda a, i, x: a.at[i].add(x, mode="drop"))(  # noqa: E731
            o, out_row, at(v))
        done = now & (stop | (t == n - 1))
        return dict(s, cache=c, tokens=put(s["tokens"], tok), logprobs=put(s["logprobs"], lp),
                    lengths=add(s["lengths"], jnp.ones_like(tok)),
                    stopped=add(s["stopped"], stop.astype(jnp.int32)),
                    busy=busy & ~done, fed=jnp.where(busy, fed_count + 1, fed_count), last=tok)

    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
    state = dict(cache=sampling._constrain_cache(lanes_cache),
                 prompt=(dict(sampling._constrain_cache(prompt_cache),
                              visible=zeros(slots, u)) if shared else {}),
                 next=zeros(D), unit=zeros(slots), busy=jnp.zeros((w,), bool), fed=zeros(w),
                 last=zeros(w), pos=zeros(slots), tail=zeros(slots, T),
                 tokens=jnp.full((D, rd, n), pad_id, jnp.int32),
                 logprobs=jnp.zeros((D, rd, n)), lengths=zeros(D, rd), stopped=zeros(D, rd))

    def waiting(s):  # [D]: units left, and enough free slots to refill
        left = ud - s["next"]
        free = (~_per_device(s["busy"], D).reshape(D, sd, u).any(-1)).sum(1)
        return (left > 0) & (free >= jnp.minimum(left, k))

    def until_refill(s):  # decode steps until a device can refill or every lane is free
        return jax.lax.while_loop(lambda s: ~jnp.any(waiting(s)) & jnp.any(s["busy"]), step, s)

    # The refill sits between step loops, not in a conditional inside one: XLA would copy every
    # cache layer around such a conditional at every step. At the start every slot is free, so
    # the first sd / k rounds only refill.
    state = jax.lax.while_loop(lambda s: jnp.any(s["busy"]) | jnp.any(s["next"] < ud),
                               lambda s: until_refill(refill(s, k)), state)
    flat = lambda x: x.reshape((b * g,) + x.shape[2:])  # noqa: E731
    return sampling.SampleOutput(flat(state["tokens"]), flat(state["logprobs"]),
                                 flat(state["lengths"]), flat(state["stopped"]) > 0)
