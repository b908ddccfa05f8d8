"""Next-token accuracy, standard and with reasoning, by difficulty (rpt_jax.evaluation).

One checkpoint, a Hugging Face folder (e.g. a base model before any training) or a training
workdir's latest (or --step) checkpoint:

    python scripts/evaluate.py --config configs/tiny.py --checkpoint /tmp/rpt_tiny
    python scripts/evaluate.py --config configs/smollm2_135m.py \
        --checkpoint ~/.cache/rpt_jax/smollm2-135m-instruct --output /tmp/eval_smollm2

Every checkpoint of a run, with accuracy against step and against training compute and the
paper's fit P(C) = A / C^alpha + P* per difficulty split:

    python scripts/evaluate.py --config configs/tiny.py --workdir /tmp/rpt_tiny

Writes <output>/results.json, results.md and (for --workdir) accuracy_vs_step.png and
accuracy_vs_compute.png (results first: a failing plot or fit loses no evaluation); prints the
table and the fits. --output defaults to <workdir>/evaluation or ./evaluation-<folder name>.

Several hosts: run the same command in each with --distributed (rpt_jax.multihost); process 0
writes the results.

Positions and proxy entropies are cached (rpt_jax.evaluation): for a workdir in <workdir>/eval,
the trainer's own eval cache, so the numbers use the positions (and, with trainer.eval_key, the
samples) the trainer's eval hook used; for
an HF folder in --cache_dir (default <output>/cache). Pass the same --cache_dir (and set
eval.proxy_checkpoint) to compare a base model and a run on identical positions.

Training compute: C = 6 * params * D, D the tokens training processed up to the step: each
step's sampled tokens from <workdir>/metrics.jsonl plus its prompt tokens, counted as
data.batch_size * sampling.num_samples * data.max_prompt_len (an upper bound: the trainer does not
log prompt lengths). Without metrics.jsonl, D = step * that bound with max_new_tokens responses.
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rpt_jax import multihost  # noqa: E402  (its flags: --distributed and the rest)

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An HF folder or an rpt_jax workdir.")
_STEP = flags.DEFINE_integer("step", None, "With a workdir --checkpoint: the step (default "
                             "latest). Rejected with an HF --checkpoint and with --workdir (which "
                             "evaluates every saved step): one step of a run is --checkpoint "
                             "<workdir> --step N.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Evaluate every saved step of this run.")
_OUTPUT = flags.DEFINE_string("output", None, "Where results and plots go.")
_CACHE = flags.DEFINE_string("cache_dir", None, "Eval-set cache (positions and entropies).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the config's, "
                                "or <workdir>/tfds; with an HF --checkpoint, <output>/tfds).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")

log = logging.getLogger("evaluate")


def _is_hf(path: str) -> bool:
    """An HF checkpoint folder: its config.json names a model type (a run's workdir holds the
    run's config.json, with none). A folder of safetensors weights whose config.json is
    missing or unreadable is named as such."""
    weights = any(f.endswith(".safetensors") for f in os.listdir(path)) \
        if os.path.isdir(path) else False
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        if weights:
            raise app.UsageError(f"{path} holds safetensors weights but no readable config.json "
                                 f"({e})") from None
        return False
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def main(argv):
    multihost.initialize()  # before any other jax call
    multihost.run(lambda: _main(argv))


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(_CHECKPOINT.value) == bool(_WORKDIR.value):
        raise app.UsageError("give exactly one of --checkpoint and --workdir")
    flag = "--checkpoint" if _CHECKPOINT.value else "--workdir"
    path = os.path.abspath(os.path.expanduser(_CHECKPOINT.value or _WORKDIR.value))
    if not os.path.isdir(path):  # before anything is created there
        raise app.UsageError(f"{flag} {path} " + (
            "is not a folder" if os.path.exists(path) else "does not exist"))
    hf_folder = _is_hf(path)
    if _WORKDIR.value and hf_folder:
        raise app.UsageError(f"--workdir {path} is an HF folder; use --checkpoint")
    if _STEP.value is not None and _WORKDIR.value:
        raise app.UsageError("--step does not apply to --workdir, which evaluates every saved "
                             "step; for one step use --checkpoint <workdir> --step N")
    if _STEP.value is not None and hf_folder:
        raise app.UsageError(f"--step does not apply to --checkpoint {path}: an HF folder holds "
                             "one set of weights")
    import jax
    import numpy as np

    from rpt_jax import config as config_lib
    from rpt_jax import evaluation, metrics_writer, scaling, sharding, trainer
    from rpt_jax import model as model_lib
    from rpt_jax import tokenizer as tokenizer_lib

    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if not hf_folder:  # before the output folder is made
        saved = evaluation.checkpoint_steps(path)
        if not saved:
            raise app.UsageError(f"no checkpoints in {evaluation.checkpoint_dir(path)}")
        if _STEP.value is not None and _STEP.value not in saved:
            raise app.UsageError(f"--step {_STEP.value}: no checkpoint step {_STEP.value} in "
                                 f"{evaluation.checkpoint_dir(path)}; saved steps: {saved}")
    config = (config_lib.use_hf_checkpoint(_CONFIG.value.copy_and_resolve_references(), path)
              if hf_folder else _CONFIG.value)
    config_lib.validate(config, jax.device_count(), jax.default_backend())
    if not hf_folder:  # the run's own tokenizer, template and model, or refuse
        trainer.check_run_config(config, path)
    output = os.path.abspath(_OUTPUT.value or (
        os.path.join(path, "evaluation") if not hf_folder
        else os.path.join(os.getcwd(), f"evaluation-{os.path.basename(path)}")))
    os.makedirs(output, exist_ok=True)
    data_dir = _DATA_DIR.value or config.data.data_dir or (
        os.path.join(output, "tfds") if hf_folder else os.path.join(path, "tfds"))
    cache_dir = _CACHE.value or (os.path.join(output, "cache") if hf_folder
                                 else os.path.join(path, "eval"))

    mesh = sharding.make_mesh(config)
    cfg = model_lib.ModelConfig.from_config(config.model)
    shardings = sharding.param_shardings(mesh, model_lib.logical_axes(cfg),
                                         model_lib.param_shapes(cfg))
    if hf_folder:
        from rpt_jax import hf
        tok = (tokenizer_lib.load_tokenizer(config) if config.data.tokenizer
               else tokenizer_lib.Tokenizer.from_dir(path))
        steps = [None]
        load = lambda _: hf.load_params(path, cfg, shardings)  # noqa: E731
        proxy_name = path
    else:
        tok = trainer.load_run_tokenizer(config, path)
        if _WORKDIR.value:
            steps = saved
        else:
            steps = [saved[-1] if _STEP.value is None else _STEP.value]
        load = lambda s: evaluation.load_workdir_params(path, s, cfg, shardings)  # noqa: E731
        # As the trainer's eval hook names its self-proxy: its cached eval set is reused.
        proxy_name = evaluation.FIRST_EVALUATION

    evaluation.stop_ids(config, tok)  # a bad sampling.stop_strings: named before any work
    if tok.vocab_size > cfg.vocab_size:
        raise app.UsageError(f"tokenizer {tok.source} has {tok.vocab_size} ids but the model's "
                             f"vocab_size is {cfg.vocab_size}; pass the model's own tokenizer")
    eval_set, results = None, []
    for step in steps:
        params = load(step)
        if eval_set is None:  # the first checkpoint is the proxy when eval.proxy_checkpoint == ""
            eval_set = evaluation.build_eval_set(
                config, tok, mesh, proxy_params=params, proxy_cfg=cfg, proxy_name=proxy_name,
                cache_dir=cache_dir, data_dir=data_dir, progress=_PROGRESS.value)
        label = os.path.basename(path) if step is None else f"step {step}"
        rng = trainer.eval_key(int(config.seed), step or 0)  # as the run's own eval of `step`
        results.append(evaluation.evaluate(params, cfg, config, tok, mesh, rng,
                                           eval_set=eval_set, label=label, step=step,
                                           progress=_PROGRESS.value))
        del params

    extra = {"checkpoint": path, "config_model": dict(config.model),
             "num_params": model_lib.num_params(cfg)}
    lines = [evaluation.render_markdown(results)]
    if jax.process_index() != 0:  # every process evaluated; one writes
        return
    _write_results(output, results, extra, lines, evaluation)
    if _WORKDIR.value:  # results are on disk first: an error here loses no evaluation
        extra.update(_scaling_report(results, config, path, cfg, output, lines,
                                     evaluation, metrics_writer, scaling, model_lib, np))
        _write_results(output, results, extra, lines, evaluation)
    print("\n".join(lines))
    plots = extra.get("plots", [])
    print(f"wrote {output}/results.md, results.json" + "".join(f", {n}" for n in plots))


def _write_results(output, results, extra, lines, evaluation):
    """<output>/results.md (the Markdown `lines`) and results.json (results plus `extra`)."""
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write("\n".join(lines))
    evaluation.write_json(results, os.path.join(output, "results.json"), extra)


def _scaling_report(results, config, workdir, cfg, output, lines, evaluation, metrics_writer,
                    scaling, model_lib, np):
    """Plots against step and compute, the power-law fits; appends Markdown to `lines`."""
    steps = [r["step"] for r in results]
    splits = list(results[0]["summary"])
    series = {}
    for mode in ("standard", "reasoning"):
        for s in splits:
            series[f"{mode} {s}"] = [np.nan if r["summary"][s][mode] is None
                                     else r["summary"][s][mode] for r in results]
    scaling.plot_vs_step(steps, series, os.path.join(output, "accuracy_vs_step.png"))
    plots = ["accuracy_vs_step.png"]

    per_step_samples = config.data.batch_size * config.sampling.num_samples
    prompt_bound = per_step_samples * config.data.max_prompt_len
    try:
        records = metrics_writer.read_metrics(workdir, "train")
    except FileNotFoundError:
        records = []
        log.warning("no %s/metrics.jsonl: compute from the configured per-step bound", workdir)
    tokens = scaling.cumulative_tokens(records, steps, prompt_bound,
                                       prompt_bound + per_step_samples
                                       * config.sampling.max_new_tokens)
    compute = scaling.training_compute(model_lib.num_params(cfg), tokens)
    reasoning = {s: series[f"reasoning {s}"] for s in splits}
    fits, fit_lines = {}, ["", "Fit P(C) = A / C^alpha + P* of reasoning accuracy (%) against "
                           "training compute C (FLOPs):", ""]
    positive = compute > 0
    for s, values in reasoning.items():
        v = np.asarray(values, np.float64)
        ok = positive & np.isfinite(v)
        try:
            fits[s] = scaling.fit_power_law(compute[ok], v[ok])
            fit_lines.append(f"- {s}: {fits[s].describe()}")
        except ValueError as e:  # too few checkpoints with compute > 0
            fit_lines.append(f"- {s}: no fit ({e})")
    if np.any(positive):
        scaling.plot_vs_compute(compute[positive],
                                {s: list(np.asarray(v)[positive]) for s, v in reasoning.items()},
                                fits, os.path.join(output, "accuracy_vs_compute.png"))
        plots.append("accuracy_vs_compute.png")
    lines += fit_lines
    return {"plots": plots,
            "compute": {"steps": steps, "tokens": tokens.tolist(), "flops": compute.tolist(),
                        "definition": "6 * num_params * tokens (sampled + prompt bound)"},
            "fits": {s: dict(a=f.a, alpha=f.alpha, p_star=f.p_star, r2=f.r2,
                             num_points=f.num_points) for s, f in fits.items()}}


if __name__ == "__main__":
    app.run(main)
