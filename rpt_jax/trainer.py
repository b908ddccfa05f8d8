"""The RPT training loop: contexts -> G sampled traces each -> reward -> advantages -> update.

`train_and_evaluate(config, workdir)` wires the modules together; the math lives in them
(sampling, reward, objective, train_step). Each step runs three jitted functions on the mesh
(sampler, rollout = reward + advantages + batch layout (rpt_jax.rollout), update); the host
only feeds the batch and fetches scalars for logging.

Determinism: step s samples with fold_in(key(seed), s); the data iterator's position and the
train state are checkpointed together (with the count of non-finite steps), so a run killed at
any moment and resumed reaches the same parameters as an uninterrupted one (bitwise on CPU) and
logs each eval once: the eval at step k runs before checkpoint k is written.

Workdir layout:
  checkpoints/<step>/   train state + data-iterator state (rpt_jax.checkpoint)
  checkpoints.corrupt/  checkpoints that failed verification (moved aside, never reused; when
                        none is left to fall back to, the run stops instead of starting over)
  tokenizer/            the run's tokenizer (the built-in BPE is trained once, then read)
  tfds/                 prepared corpora, unless data.data_dir is set
  eval/                 the cached eval set
  profile/              jax.profiler traces of logging.profile_start.. (rpt_jax.profiling)
  config.json           the run's config (rl.micro_batches=0 resolved); a resume that changes
                        it says which keys changed
  metrics.jsonl, tensorboard/   (rpt_jax.metrics_writer)
  samples.jsonl         every logging.samples_every steps, the first logging.samples_contexts
                        contexts with their G samples, predictions and rewards, to read
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp

from rpt_jax import checkpoint, contexts, evaluation, metrics_writer, objective
from rpt_jax import config as config_lib
from rpt_jax import model as model_lib
from rpt_jax import profiling, rollout as rollout_lib, sampling, sharding, train_step, warmup
from rpt_jax import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

# Stream ids folded into key(seed) for the one-off draws; steps use fold_in(key(seed), step)
# and never reach these.
_INIT_STREAM = 1 << 30
GROUPED_KEYS = ("doc_tokens", "doc_mask", "doc_visible", "tail_tokens")  # sampler input


@dataclasses.dataclass
class TrainResult:
    status: str  # "done" | "preempted" (SIGTERM/SIGINT: saved, clean exit; in the format
    # warm-up: nothing saved, state None, a restart starts over) | "bad_steps"
    step: int  # loop steps done, skipped ones included (= the last checkpoint unless "bad_steps")
    state: train_step.TrainState | None  # None when stopped in the warm-up, before step 0
    metrics: dict  # the last step's logged scalars


def step_key(seed: int, step: int) -> jax.Array:
    """The PRNG key of training step `step` (sampling draws from it)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def eval_key(seed: int, step: int) -> jax.Array:
    """The sampling key of the evaluation of checkpoint `step` (scripts/evaluate.py uses it too,
    so it reproduces the run's own eval of a checkpoint)."""
    return jax.random.fold_in(step_key(seed, step), _INIT_STREAM)


# ----------------------------------------------------------------------------- set-up

def load_run_tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
    """The tokenizer the config names; the built-in one is trained once and kept in workdir."""
    if config.data.tokenizer or config.model.hf_checkpoint:
        return tokenizer_lib.load_tokenizer(config)
    folder = os.path.join(workdir, "tokenizer")
    saved = os.path.join(folder, tokenizer_lib.TOKENIZER_JSON)

    def train_once():
        if not os.path.isfile(saved):
            tokenizer_lib.load_tokenizer(config).save(folder)

    sharding.on_process_zero("rpt_jax tokenizer", train_once)
    if not os.path.isfile(saved):  # a host-local workdir: train the same one here
        return tokenizer_lib.load_tokenizer(config)
    tok = tokenizer_lib.Tokenizer.from_dir(folder)
    if tok.vocab_size > config.model.vocab_size:
        raise ValueError(f"{folder} has {tok.vocab_size} ids but model.vocab_size="
                         f"{config.model.vocab_size}; use a fresh --workdir")
    return tok


def check_hf_shape(config, folder: str) -> None:
    """Raise when config.model's architecture differs from the HF checkpoint's config.json, or
    its tensors from that architecture (file headers only: before anything compiles)."""
    from rpt_jax import hf
    theirs = hf.model_config_from_hf(folder)
    diff = {k: (config.model[k], v) for k, v in theirs.items()
            if k in config.model and config.model[k] != v}
    if diff:
        raise ValueError(f"model.hf_checkpoint={folder} does not match config.model: "
                         + ", ".join(f"model.{k}={a!r} but the checkpoint has {b!r}"
                                     for k, (a, b) in diff.items()))
    hf.check_checkpoint(folder, model_lib.ModelConfig.from_config(config.model))


def initial_params(config, model_cfg, p_shardings):
    """Params of a fresh run: model.hf_checkpoint, else random init from the seed."""
    if config.model.hf_checkpoint:
        from rpt_jax import hf
        log.info("loading %s", config.model.hf_checkpoint)
        return hf.load_params(config.model.hf_checkpoint, model_cfg, p_shardings)
    key = jax.random.fold_in(jax.random.key(config.seed), _INIT_STREAM)
    init = jax.jit(model_lib.init, static_argnums=0, out_shardings=p_shardings)
    return init(model_cfg, key)


def reference_params(config, workdir, model_cfg, p_shardings, params=None):
    """The KL reference policy (rl.kl_coef > 0): the policy RL starts from (after the warm-up),
    in the compute dtype, saved once in <workdir>/reference and restored from there on resume (a
    fresh start replaces one it finds there: left by a run killed before its first checkpoint).

    params: the fresh run's starting params (None when resuming). Raises ValueError when a
    resumed run has no saved reference (it was started with rl.kl_coef = 0).
    """
    directory = os.path.join(workdir, "reference")
    if params is not None:  # a fresh start makes its own (a run killed before its first
        # checkpoint may have left one)
        sharding.on_process_zero("rpt_jax_fresh_reference",
                                 lambda: shutil.rmtree(directory, ignore_errors=True))
    ckpt = checkpoint.Checkpointer(directory, keep=1, async_save=False)
    dtype = jnp.dtype(model_cfg.dtype)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                            model_lib.param_shapes(model_cfg), p_shardings)
    try:
        restored = ckpt.restore(abstract)
        if restored is not None:
            return restored.state
        if params is None:
            raise ValueError(f"rl.kl_coef > 0 but {directory} holds no reference policy: the "
                             f"run was started with rl.kl_coef = 0; start it again in a new "
                             f"workdir")
        # a copy even where the dtype matches: the train step donates the policy's buffers
        reference = jax.jit(lambda p: jax.tree.map(lambda x: jnp.copy(x).astype(dtype), p),
                            out_shardings=p_shardings)(params)
        ckpt.save(0, reference)
        return reference
    finally:
        ckpt.close()


class StopFlag:
    """SIGTERM / SIGINT set a flag that the loop checks once per step (a second SIGINT raises
    KeyboardInterrupt). Every process stops at the same step: the flags are or-ed across hosts."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: stopping after this step (and saving a checkpoint, unless in "
                    "the format warm-up)",
                    signal.Signals(signum).name)

    def requested(self) -> bool:
        return sharding.any_process(self.signum is not None)


def _memory() -> dict:
    out = {}
    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_in_use" in stats:
        out["device_gib"] = stats["bytes_in_use"] / 2**30
    try:
        with open("/proc/self/statm") as f:
            out["host_rss_gib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        pass
    return out


def make_state(config, mesh):
    """(model config, param shardings, optimizer, TrainState shardings, abstract TrainState)."""
    model_cfg = model_lib.ModelConfig.from_config(config.model)
    p_shapes = model_lib.param_shapes(model_cfg)
    p_shardings = sharding.param_shardings(mesh, model_lib.logical_axes(model_cfg), p_shapes)
    tx = train_step.make_optimizer(config.optim, config.num_steps)
    s_shardings = train_step.state_shardings(mesh, tx, p_shapes, p_shardings)
    abstract = train_step.abstract_state(model_cfg, tx, s_shardings)
    return model_cfg, p_shardings, tx, s_shardings, abstract


def make_update(config, mesh):
    """(model config, param shardings, optimizer, abstract TrainState, update fn) of a run."""
    model_cfg, p_shardings, tx, s_shardings, abstract = make_state(config, mesh)
    update = train_step.make_train_step(config, model_cfg, mesh, s_shardings, tx,
                                        logits_chunk=int(config.rl.logits_chunk))
    return model_cfg, p_shardings, tx, abstract, update


def largest_prompt(config) -> int:
    """The widest prompt bucket the data can produce."""
    return min(b for b in config.sampling.prompt_buckets if b >= config.data.max_prompt_len)


def check_update_memory(config, update, abstract, mesh, bytes_per_device=None) -> int:
    """Compile the update (`make_update`'s) for the largest prompt bucket, and raise
    train_step.DoesNotFit now, before any weights load or sampling, when it cannot fit (its
    `check_memory`; bytes_per_device: default what the devices report). Returns XLA's peak
    estimate, bytes a device."""
    P = largest_prompt(config)
    batch = objective.train_batch_shapes(
        int(config.data.batch_size), P, int(config.sampling.max_new_tokens),
        int(config.sampling.num_samples), ref_logprobs=bool(config.rl.kl_coef))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=sharding.batch_sharding(mesh, v.ndim))
             for k, v in batch.items()}  # as the rollout hands it over: no second compile
    peak = update.check_memory(abstract, batch, P, bytes_per_device)
    log.info("update compiled for prompt bucket %d: %.3g GiB a device by XLA's estimate", P,
             peak / 2**30)
    return peak


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Keys that make a checkpoint mean something else: reading one with other values (evaluating,
# exporting) would give silently wrong results.
RUN_IDENTITY = (
    *(f"model.{k}" for k in config_lib.model_shape("tiny")), "model.hf_checkpoint",
    "data.tokenizer", "data.template", "data.chat_template", "reward.think_end")


def saved_config(workdir: str) -> dict | None:
    """<workdir>/config.json as written by `save_config`, or None. Raises if it is an HF model's
    config.json: the folder is a model, not a run's workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    old = tokenizer_lib.read_json(path)
    if isinstance(old, dict) and ("model_type" in old or "architectures" in old):
        raise ValueError(f"{path} is a Hugging Face model's config: {workdir} is a model folder, "
                         f"not a run's workdir (use another workdir)")
    return old


def config_changes(config, workdir: str) -> list[str]:
    """The keys whose values differ from <workdir>/config.json (none when there is none), each
    logged with both values as a warning. A key the file lacks (written before the key existed)
    counts as its default."""
    old = saved_config(workdir)
    if old is None:
        return []
    path = os.path.join(workdir, "config.json")
    flat = lambda c: _flat(json.loads(c.to_json_best_effort()))  # noqa: E731
    new = flat(config)
    preset = config.model.preset
    defaults = flat(config_lib.base_config(preset if preset in config_lib.MODEL_SHAPES else "tiny"))
    old = {**{k: defaults[k] for k in new.keys() & defaults.keys()}, **_flat(old)}
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        log.warning("the config differs from the one in %s: %s", path, "; ".join(
            f"{k}: {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}" for k in changed))
    return changed


def check_run_config(config, workdir: str) -> None:
    """Before reading a run's checkpoints with `config` (evaluate.py, export_hf.py): raise if it
    differs from the run's own config.json in a RUN_IDENTITY key; other changes are warned."""
    wrong = [k for k in config_changes(config, workdir) if k in RUN_IDENTITY]
    if wrong:
        raise ValueError(f"the config differs from the run's {workdir}/config.json in {wrong}, "
                         f"which change what its checkpoints mean: pass the run's own values "
                         f"(the same --config and overrides)")


def save_config(config, workdir: str) -> list[str]:
    """Write <workdir>/config.json (process 0). When a run in this workdir wrote one before,
    warn about every key whose value differs (a resume with another config is not the same
    run) and return those keys."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    changed = config_changes(config, workdir)
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    return changed


def fit_update(config, mesh, bytes_per_device=None):
    """`make_update`, checked by `check_update_memory`. With rl.micro_batches=0, the fewest
    micro-batches whose update fits: a bisection over `train_step.micro_batch_choices`, one
    compile a probe (on devices that report no memory, as CPUs, the first choice: 1).
    Returns (config with that count, make_update's tuple, XLA's peak estimate in bytes a
    device); raises train_step.DoesNotFit."""
    if int(config.rl.micro_batches):
        parts = make_update(config, mesh)
        return config, parts, check_update_memory(config, parts[4], parts[3], mesh,
                                                  bytes_per_device)
    rows = int(config.data.batch_size) * int(config.sampling.num_samples)
    choices = train_step.micro_batch_choices(rows, mesh.shape["data"] * mesh.shape["fsdp"])
    if bytes_per_device is None and sharding.device_bytes(mesh) is None:
        choices = choices[:1]  # nothing to fit: no bisection
    lo, hi, best, error = 0, len(choices) - 1, None, None
    while lo <= hi:
        mid = (lo + hi) // 2
        trial = config.copy_and_resolve_references()
        trial.rl.micro_batches = choices[mid]
        parts = make_update(trial, mesh)
        try:
            peak = check_update_memory(trial, parts[4], parts[3], mesh, bytes_per_device)
        except train_step.DoesNotFit as e:
            lo, error = mid + 1, e
            continue
        best, hi = (trial, parts, peak), mid - 1
    if best is None:
        raise train_step.DoesNotFit(f"rl.micro_batches=0: none of {choices} fits; the most: "
                                    f"{error}")
    log.info("rl.micro_batches=0: %d micro-batches, the fewest of %s whose update fits",
             best[0].rl.micro_batches, choices)
    return best


# ----------------------------------------------------------------------------- evaluation hook

def run_eval(state_params, config, model_cfg, tokenizer, mesh, workdir, data_dir, step,
             sampler, eval_set=None):
    """The periodic evaluation (rpt_jax.evaluation): standard and reasoning next-token accuracy
    on config.eval.split. Returns (flat metrics, eval set to reuse)."""
    cache = os.path.join(workdir, "eval")
    if eval_set is None:
        eval_set = evaluation.build_eval_set(
            config, tokenizer, mesh, proxy_params=state_params, proxy_cfg=model_cfg,
            proxy_name=evaluation.FIRST_EVALUATION, cache_dir=cache, data_dir=data_dir,
            progress=False, resumed_at=step)
    same_g = int(config.eval.num_samples) == int(config.sampling.num_samples)
    rng = eval_key(config.seed, step)
    result = evaluation.evaluate(state_params, model_cfg, config, tokenizer, mesh, rng,
                                 eval_set=eval_set, label=f"step {step}", step=step,
                                 sampler=sampler if same_g else None, progress=False)
    metrics = dict(result["metrics"])
    metrics.update({f"eval/{k}": v for k, v in result["diagnostics"].items()})
    return metrics, eval_set


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config, workdir: str, *, progress: bool = True) -> TrainResult:
    """Train to config.num_steps in `workdir`, resuming from its newest good checkpoint.

    SIGTERM or Ctrl-C during the run: the current step finishes, a checkpoint is written and the
    result has status "preempted" (during the format warm-up: nothing is written, a restart starts
    over). progress: show tqdm bars (process 0 only).
    """
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.default_backend())
    if config.sampling.greedy:  # G equal samples: equal rewards, zero advantages
        raise ValueError("sampling.greedy=True makes a context's sampling.num_samples samples "
                         "identical, so GRPO has nothing to learn from; sample with a "
                         "temperature (greedy is for evaluation)")
    if config.data.entropy_threshold > 0 and not config.data.proxy_checkpoint:  # before compiles
        raise ValueError(f"data.entropy_threshold={config.data.entropy_threshold} needs "
                         "data.proxy_checkpoint (the model that scores each position)")
    if config.model.hf_checkpoint:
        check_hf_shape(config, config.model.hf_checkpoint)
    evals = int(config.eval.every) > 0
    for proxy in dict.fromkeys((config.data.proxy_checkpoint,
                                config.eval.proxy_checkpoint if evals else "")):
        if proxy:  # the entropy proxies, from their headers too
            contexts.check_proxy(config, proxy)
    if "://" in workdir:  # abspath would make it a local folder named "gs:"
        raise ValueError(f"workdir {workdir}: a URL; rpt_jax writes a local path (mount the "
                         "bucket, e.g. with gcsfuse, and pass the mount point)")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    saved_config(workdir)  # an HF model folder given as the workdir raises here
    os.makedirs(workdir, exist_ok=True)
    stop = StopFlag().install()
    try:
        return _run(config, workdir, mesh_shape, stop, progress)
    finally:
        stop.restore()


def _run(config, workdir, mesh_shape, stop, progress) -> TrainResult:
    mesh = sharding.make_mesh(config)
    log.info("mesh (data, fsdp, tensor) = %s over %d devices", mesh_shape, jax.device_count())
    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")

    tokenizer = load_run_tokenizer(config, workdir)
    # a bad stop string, template or chat template fails here, before anything compiles
    stop_ids = evaluation.stop_ids(config, tokenizer)
    contexts.ExampleSpec.from_config(config, tokenizer)
    # before any data or weights load: the update must fit (rl.micro_batches=0: found here)
    config, (model_cfg, p_shardings, tx, abstract, update), _ = fit_update(config, mesh)
    # the data before the state: a proxy scoring missing entropies has the devices to itself
    train_iter = contexts.ContextIterator(
        config, "train", tokenizer, data_dir=data_dir,
        rows=sharding.process_rows(mesh, config.data.batch_size))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   keep=config.checkpoint.keep, every=config.checkpoint.every)
    restored = ckpt.restore(abstract)  # a workdir of another model raises here...
    save_config(config, workdir)  # ...before its config.json is rewritten
    writer = metrics_writer.MetricsWriter(
        workdir, tensorboard=config.logging.tensorboard, jsonl=config.logging.jsonl,
        resume_step=None if restored is None else restored.step)
    reference = None
    # non-finite updates: (in a row, in all), saved with each checkpoint so a resume stops
    # where the uninterrupted run would
    bad_in_a_row = bad_total = 0
    if restored is not None:
        state, start = restored.state, restored.step
        train_iter.set_state(restored.meta["data"])
        bad_in_a_row, bad_total = restored.meta.get("bad_steps", (0, 0))
        log.info("resumed from step %d", start)
        if config.rl.kl_coef:
            reference = reference_params(config, workdir, model_cfg, p_shardings)
    else:
        start = 0
        sharding.on_process_zero("rpt_jax_forget_eval_sets", lambda: (
            evaluation.forget_first_evaluation(os.path.join(workdir, "eval"))))
        params = initial_params(config, model_cfg, p_shardings)
        if config.warmup.steps > 0:
            params = _warm_up(params, config, model_cfg, mesh, p_shardings, tokenizer, data_dir,
                              writer, progress, stop.requested)
            if params is None:  # nothing saved yet: a restart begins afresh, as this run did
                writer.close()
                ckpt.close()
                log.info("preempted in the format warm-up: nothing saved (a restart starts over)")
                return TrainResult("preempted", 0, None, {})
        if config.rl.kl_coef:  # saved before step 0, so every checkpoint has its reference
            reference = reference_params(config, workdir, model_cfg, p_shardings, params)
        state = train_step.init_train_state(params, tx, mesh, p_shardings)
    log.info("model: %s, %.2fM params", config.model.preset, model_lib.num_params(model_cfg) / 1e6)

    sampling_cfg = sampling.SamplingConfig.from_config(
        config.sampling, stop_ids)
    # what stays on the devices while they sample: optimizer state, KL reference
    kept = sharding.stored_bytes((abstract.opt_state, reference or ()))
    sampler = sampling.make_sampler(mesh, model_cfg, sampling_cfg, p_shardings,
                                    pad_id=tokenizer.pad_id, reserved_bytes=kept)
    rollout = rollout_lib.make_rollout(config, model_cfg, mesh)
    table = jax.device_put(evaluation.padded_byte_table(tokenizer, model_cfg.vocab_size),
                           sharding.replicated(mesh))
    schedule = train_step.make_schedule(config.optim, config.num_steps)
    jitted = (sampler.jitted, rollout.jitted, update.jitted)

    def compiled():  # variants compiled so far, the evals' samplers included (jit's private
        # _cache_size: a jax without it gives 0, and the recompile warning stays silent)
        return sum(getattr(f, "_cache_size", lambda: 0)() for f in jitted)

    num_steps, eval_every = int(config.num_steps), int(config.eval.every)
    samples_every = int(config.logging.samples_every)
    eval_set, status, last = None, "done", {}
    compiles_seen = None
    profiler = profiling.StepProfiler(os.path.join(workdir, "profile"),
                                      config.logging.profile_start, config.logging.profile_steps)

    from tqdm import tqdm
    bar = tqdm(total=num_steps, initial=start, desc="rpt", unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0, delay=0.1)

    def say(level, msg, *args):  # a log line on its own line, not glued to the progress bar
        bar.clear()
        log.log(level, msg, *args)
        bar.refresh()

    def evaluate(step):
        nonlocal eval_set
        t = time.time()
        m, eval_set = run_eval(state.params, config, model_cfg, tokenizer, mesh, workdir,
                               data_dir, step, sampler, eval_set)
        m["eval/seconds"] = time.time() - t
        writer.write(step, m, kind="eval")
        say(logging.INFO, "eval at step %d: %s", step,
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()) if isinstance(v, (int, float))))

    def meta():  # what a checkpoint holds besides the train state
        return {"data": train_iter.get_state(), "bad_steps": [bad_in_a_row, bad_total]}

    # The eval at step k runs before checkpoint k is written: a run resumed from checkpoint k has
    # had it, one killed during it redoes the steps since the checkpoint before, then the eval.
    if restored is None:
        if eval_every > 0:
            evaluate(0)
        ckpt.save(0, state, meta())
    done, t_last = start, time.time()
    try:
        while done < num_steps:
            if stop.requested():
                status = "preempted"
                break
            step = done
            use_keep = bool(config.rl.dynamic_sampling) and step >= config.rl.dynamic_sampling_start
            with profiler.step(step):
                batch = contexts.to_global({k: v for k, v in next(train_iter).items()
                                            if k in rollout_lib.ROLLOUT_KEYS + GROUPED_KEYS},
                                           mesh)
                samples = sampler(state.params, sampling.Prompts.from_batch(batch),
                                  step_key(config.seed, step))
                batch = {k: batch[k] for k in rollout_lib.ROLLOUT_KEYS}
                train_batch, roll, shown = rollout(state.params, samples, batch, table,
                                                   jnp.asarray(use_keep), reference)
                state, upd = update(state, train_batch, batch["prompt_tokens"].shape[1])
                roll, upd, count = jax.device_get((roll, upd, state.step))  # the one host sync
            done = step + 1

            now = time.time()
            compiles = compiled()
            if compiles_seen is not None and compiles > compiles_seen and done > start + 2:
                say(logging.WARNING, "recompiled at step %d (%d compiled variants now): a new "
                    "prompt bucket or an unstable shape", done, compiles)
            compiles_seen = compiles
            finite = bool(upd["finite"])
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            bad_total += not finite
            last = {**roll, **upd, "lr": float(schedule(int(count) - int(upd["applied"]))),
                    "step_seconds": now - t_last, "compiles": compiles, "bad_steps": bad_total,
                    "tokens_per_second": float(roll["sampled_tokens"]) / max(now - t_last, 1e-9),
                    **_memory()}
            t_last = now
            if done % int(config.logging.every) == 0 or done == num_steps:
                writer.write(done, last)
            if samples_every and done % samples_every == 0 and writer.enabled:
                writer.write_samples(done, rollout_lib.records(
                    jax.device_get(shown), tokenizer, config.reward.think_end,
                    int(config.sampling.num_samples)))
            bar.set_postfix(reward=f"{last['reward']:.3f}", acc=f"{last['accuracy']:.3f}",
                            len=f"{last['response_len']:.1f}",
                            tok_s=f"{last['tokens_per_second']:.0f}", refresh=False)
            bar.update(1)

            if not finite:
                say(logging.WARNING, "step %d: non-finite loss or gradient, update skipped "
                    "(%d in a row)", done, bad_in_a_row)
                if bad_in_a_row >= int(config.optim.max_bad_steps):
                    status = "bad_steps"
                    say(logging.ERROR, "stopping: %d non-finite steps in a row (optim.max_bad_steps"
                        "=%d); the last good checkpoint is step %s in %s", bad_in_a_row,
                        config.optim.max_bad_steps, ckpt.latest_step(), ckpt.directory)
                    break
            # the last step's eval too, before its checkpoint: a run killed in it redoes it
            if eval_every > 0 and (done % eval_every == 0 or done == num_steps):
                evaluate(done)
                compiles_seen = compiled()  # an eval's own shapes are no training recompile
            writer.flush()  # TensorBoard's too: a kill loses no record a resume will not redo
            ckpt.maybe_save(done, state, meta())
        bar.close()
        if status != "bad_steps":
            ckpt.save(done, state, meta())  # skipped if saved already
    finally:  # also on an exception: let pending checkpoint writes finish
        profiler.close()
        ckpt.close()
        writer.close()
    log.info("%s at step %d (checkpoints in %s)", status, done, ckpt.directory)
    return TrainResult(status, done, state, last)


def _warm_up(params, config, model_cfg, mesh, p_shardings, tokenizer, data_dir, writer,
             progress, should_stop):
    """rpt_jax.warmup on the train split, drawn with seed+1 (positions differ from RL's); None
    when should_stop() interrupted it."""
    wconfig = config.copy_and_resolve_references()
    with wconfig.unlocked():
        wconfig.seed = int(config.seed) + 1
    batches = contexts.ContextIterator(wconfig, "train", tokenizer, data_dir=data_dir,
                                       rows=sharding.process_rows(mesh, config.data.batch_size))
    steps = int(config.warmup.steps)
    from tqdm import tqdm
    bar = tqdm(total=steps, desc="format warm-up", unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)

    def log_fn(i, m):
        writer.write(i - steps, m, kind="warmup")  # steps -W..-1: before RL step 0
        bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
        bar.update(1)

    params = warmup.warm_up(params, config, model_cfg, mesh, p_shardings, tokenizer, batches,
                            log_fn, should_stop)
    bar.close()
    return params
