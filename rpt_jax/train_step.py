"""The policy-gradient update: optax optimizer, train state, the jitted sharded step.

Params and optimizer state live in float32, sharded by `sharding.RULES`; the model computes in
`ModelConfig.dtype` (bf16 on accelerators). The batch (see `objective.make_train_batch`) is split
into `rl.micro_batches` slices; a `lax.scan` carries (grad_sum, loss_sum, count) over them and
divides once at the end, so the update equals the one-slice update exactly (up to float
summation order). The LM head and the loss run fused per chunk of positions
(`objective.fused_policy_loss`): no [N, S, V] logits, no recompute of them. A step whose loss
or gradient is not finite leaves the state untouched and says so in its metrics; the trainer
decides when to stop. `check_memory` compiles the update from shapes alone and refuses one that
cannot fit (`DoesNotFit`).

Config fields read: optim.{lr, b1, b2, eps, weight_decay, grad_clip, warmup_steps, schedule};
rl.{loss_agg, clip_low, clip_high, kl_coef, entropy_coef, micro_batches}; sampling.{temperature,
num_samples, max_new_tokens}. Any object with these attributes works (no ml-collections needed).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rpt_jax import model, objective, sharding


class DoesNotFit(ValueError):
    """The update cannot fit a device's memory (`check_memory`)."""


def micro_batch_choices(rows: int, split: int) -> list[int]:
    """The rl.micro_batches values that cut `rows` into slices divisible by `split` (the
    mesh's data * fsdp), ascending."""
    return [m for m in range(1, rows + 1) if rows % m == 0 and (rows // m) % split == 0]


class TrainState(NamedTuple):
    params: Any  # float32 weights, model.init's tree
    opt_state: Any  # optax state, sharded like the params it mirrors
    step: jax.Array  # int32 count of applied updates (skipped steps do not count)


# ----------------------------------------------------------------------------- optimizer

def make_schedule(optim, num_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to optim.lr over optim.warmup_steps, then constant or cosine to 0."""
    warmup = int(optim.warmup_steps)
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, max(num_steps - warmup, 1))
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not one of ('constant', 'cosine')")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def _decay_mask(params):
    # As Hugging Face's Trainer: no weight decay on norm scales and biases.
    def keep(path, _):
        name = jax.tree_util.keystr(path)
        return "norm" not in name and "bias" not in name
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (optim.grad_clip; <= 0 disables) then AdamW on the schedule.

    Non-finite gradients are handled by the train step (it keeps the old state), not here:
    optax.apply_if_finite would also skip the update, but it advances its own counters inside
    the optimizer state and hides the skip from the step's metrics.
    """
    parts = []
    if optim.grad_clip and optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.adamw(make_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                             eps=optim.eps, weight_decay=optim.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- state

def state_shardings(mesh, tx, param_shapes, param_shardings) -> TrainState:
    """TrainState of NamedShardings: optimizer moments sharded like their params, scalars replicated."""
    return TrainState(
        params=param_shardings,
        opt_state=sharding.opt_state_shardings(mesh, tx, param_shapes, param_shardings),
        step=sharding.replicated(mesh))


def fresh_state(params, tx) -> TrainState:
    """The TrainState of `params` before any update."""
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))


def init_train_state(params, tx, mesh, param_shardings) -> TrainState:
    """A fresh TrainState built on device with its final shardings (nothing replicated first)."""
    shapes = jax.eval_shape(lambda p: p, params)
    out = state_shardings(mesh, tx, shapes, param_shardings)
    init = jax.jit(lambda p: fresh_state(p, tx), in_shardings=(param_shardings,),
                   out_shardings=out)
    return init(params)


def abstract_state(model_cfg: model.ModelConfig, tx, shardings: TrainState) -> TrainState:
    """The TrainState as jax.ShapeDtypeStructs with their shardings (a restore or compile
    target)."""
    shapes = jax.eval_shape(lambda p: fresh_state(p, tx), model.param_shapes(model_cfg))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


# ----------------------------------------------------------------------------- step

def sum_over_slices(fn, batch, M: int, mesh, combine, carry_shardings=None):
    """fn(slice) summed over the M row slices of `batch` by a lax.scan (traceable).

    Slice m holds rows m, m + M, ...: each device's rows split evenly across the slices, so no
    slice sits on a subset of the devices. combine(a, b) adds two of fn's outputs; zeros start
    the sum. carry_shardings: a sharding for the carry's first element (e.g. the gradients').
    """
    if M == 1:
        return fn(batch)

    def slices(x):
        x = x.reshape(x.shape[0] // M, M, *x.shape[1:])
        return jax.lax.with_sharding_constraint(
            jnp.swapaxes(x, 0, 1), NamedSharding(mesh, P(None, sharding.BATCH)))

    mbs = jax.tree.map(slices, batch)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(fn, jax.tree.map(lambda x: x[0], mbs)))
    if carry_shardings is not None:
        zeros = (jax.lax.with_sharding_constraint(zeros[0], carry_shardings),) + zeros[1:]
    total, _ = jax.lax.scan(lambda carry, mb: (combine(carry, fn(mb)), None), zeros, mbs)
    return total


BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask", "old_logprobs", "advantages")


def _check_batch(batch, kl_coef, micro_batches, G):
    missing = [k for k in BATCH_KEYS if k not in batch]
    if kl_coef and "ref_logprobs" not in batch:
        missing.append("ref_logprobs (rl.kl_coef > 0)")
    if missing:
        raise ValueError(f"train batch is missing {missing}; build it with "
                         f"objective.make_train_batch")
    N, S = batch["tokens"].shape
    for k, v in batch.items():
        want = (N,) if k == "advantages" else (N, S)
        if v.shape != want:
            raise ValueError(f"train batch[{k!r}] has shape {v.shape}, expected {want}")
    if N % micro_batches:
        raise ValueError(f"batch of {N} rows does not split into rl.micro_batches={micro_batches}")
    if N % G:
        raise ValueError(f"batch of {N} rows is not a multiple of sampling.num_samples={G}")


def make_train_step(config, model_cfg: model.ModelConfig, mesh, shardings: TrainState, tx,
                    logits_chunk: int = 256):
    """The update fn(state, batch, prompt_len=0) -> (state, metrics), jitted on `mesh`; the
    state is donated. With rl.share_prompt and prompt_len = P of the batch, each context's
    prompt columns are computed once for its samples (`model.hidden_states_shared_prompt`).

    batch: objective.make_train_batch's dict, rows sharded over the mesh's data axes (plus
    ref_logprobs [N, S] when rl.kl_coef > 0). logits_chunk: positions per LM-head chunk, the
    memory knob: [rows per device, logits_chunk, V] float32 logits exist at once. metrics:
    scalars (loss, clip_frac, approx_kl, logp_gap, logp_gap_max, entropy, kl_ref if used,
    grad_norm, zero_adv_group_frac, loss_tokens, finite, applied).
    """
    rl, temperature = config.rl, float(config.sampling.temperature)
    G, M = int(config.sampling.num_samples), int(rl.micro_batches)
    if rl.loss_agg not in objective.AGGREGATIONS:
        raise ValueError(f"rl.loss_agg={rl.loss_agg!r} is not one of {objective.AGGREGATIONS}")
    loss_kw = dict(clip_low=float(rl.clip_low), clip_high=float(rl.clip_high), agg=rl.loss_agg,
                   max_len=int(config.sampling.max_new_tokens), kl_coef=float(rl.kl_coef),
                   entropy_coef=float(rl.entropy_coef))
    rows = P(sharding.BATCH)
    # a micro-batch (rows m, m + M, ...) holds G / M consecutive samples of each context
    share = bool(getattr(rl, "share_prompt", False)) and G % M == 0 and G // M > 1

    def loss_terms(params, mb, prompt_len):
        if share and prompt_len:
            h = model.hidden_states_shared_prompt(params, mb["tokens"], model_cfg,
                                                  mb["positions"], mb["segment_ids"], G // M,
                                                  prompt_len)
            # the columns h covers: every loss token and all that the loss reads of a row
            mb = {k: v[:, prompt_len - 1:] if v.ndim == 2 else v for k, v in mb.items()}
        else:
            h, _ = model.hidden_states(params, mb["tokens"], model_cfg, mb["positions"],
                                       mb["segment_ids"])
        loss_sum, count, stats = objective.fused_policy_loss(
            params, h, mb, model_cfg, temperature, chunk=logits_chunk, **loss_kw)
        return loss_sum, (count, stats)

    grad_fn = jax.grad(loss_terms, has_aux=True)

    def step(state: TrainState, batch, prompt_len):
        def micro(params, mb):
            grads, (count, stats) = grad_fn(params, mb, prompt_len)
            return jax.lax.with_sharding_constraint(grads, shardings.params), count, stats

        _check_batch(batch, rl.kl_coef, M, G)
        batch = jax.lax.with_sharding_constraint(
            batch, jax.tree.map(lambda _: NamedSharding(mesh, rows), batch))
        # zeros start every sum and max (the maxima are of absolute values)
        grads, count, stats = sum_over_slices(
            lambda mb: micro(state.params, mb), batch, M, mesh,
            lambda a, b: (jax.tree.map(jnp.add, a[0], b[0]), a[1] + b[1],
                          objective.combine_stats(a[2], b[2])), shardings.params)

        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        metrics = objective.finalize_stats(stats)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        applied = finite & (count > 0)  # all groups dropped: nothing to learn from
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state, state.step + 1)
        new = jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, state)

        zero_groups = jnp.all(batch["advantages"].reshape(-1, G) == 0, axis=1)
        metrics.update(grad_norm=grad_norm, finite=finite, applied=applied,
                       zero_adv_group_frac=jnp.mean(zero_groups.astype(jnp.float32)),
                       loss_tokens=jnp.sum(batch["loss_mask"]))
        return new, metrics

    jitted = jax.jit(step, in_shardings=(shardings, NamedSharding(mesh, rows)),
                     out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,),
                     static_argnums=(2,))

    def run(state, batch, prompt_len: int = 0):
        """prompt_len: P of make_train_batch's rows; with rl.share_prompt the prompt columns
        are then computed once per context (0: every row whole)."""
        with jax.set_mesh(mesh):  # activates the model's activation sharding constraints
            return jitted(state, batch, int(prompt_len))

    def check_memory(state, batch, prompt_len: int = 0, bytes_per_device: int | None = None):
        """Compile the update for these shapes (arrays or ShapeDtypeStructs) and raise
        DoesNotFit (a ValueError), before anything runs, when it cannot fit: XLA's peak
        estimate over a device's memory (`bytes_per_device`; default what the devices report,
        no check where they report nothing, as on CPU), or a compiler that refuses it (TPU).
        jit keeps the compiled program, so the first real call with these shapes compiles
        nothing new. Returns the peak estimate in bytes per device."""
        N, S = batch["tokens"].shape
        what = (f"the update of {N} rows x {S} tokens in rl.micro_batches={M} slices "
                f"(rl.logits_chunk={logits_chunk}, model.remat={model_cfg.remat!r}) on mesh "
                f"{dict(mesh.shape)}")
        more = [m for m in micro_batch_choices(N, mesh.shape["data"] * mesh.shape["fsdp"])
                if m > M]
        advice = (f"raise rl.micro_batches{f' (next valid: {more[0]})' if more else ''}, lower "
                  f"rl.logits_chunk, set model.remat='full', or spread the state over more "
                  f"devices (mesh.fsdp)")
        try:
            with jax.set_mesh(mesh):
                compiled = jitted.lower(state, batch, int(prompt_len)).compile()
        except Exception as e:  # noqa: BLE001 (XLA's errors have no narrower common type)
            if not any(k in str(e) for k in ("RESOURCE_EXHAUSTED", "ut of memory")):
                raise
            raise DoesNotFit(f"{what} does not fit: the compiler refused it "
                             f"({str(e).splitlines()[0][:300]}); {advice}") from e
        peak = sharding.peak_bytes(compiled, mesh.devices.flat[0].platform)
        if bytes_per_device is None:
            total = sharding.device_bytes(mesh)
            bytes_per_device = total and total // mesh.devices.size
        if bytes_per_device and peak > bytes_per_device:
            raise DoesNotFit(f"{what} needs {peak / 2**30:.3g} GiB a device by XLA's estimate "
                             f"but a device has {bytes_per_device / 2**30:.3g} GiB; {advice}")
        return peak

    run.jitted = jitted
    run.check_memory = check_memory
    return run
