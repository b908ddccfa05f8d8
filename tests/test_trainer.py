"""The training loop on a 1-layer model: a short run, resume equals uninterrupted (bitwise, after
a corrupt latest checkpoint too), SIGTERM saves and exits cleanly, kill -9 resumes, a non-finite
step is skipped and K in a row stop the run."""
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from rpt_jax import checkpoint, metrics_writer, sampling, sharding, train_step, trainer
from rpt_jax import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 12
# configs/tiny.py shrunk: 1 layer of width 32, 8 contexts x 4 samples of up to 12 tokens, one
# prompt bucket, checkpoints every 2 steps (the last 3 kept), evals at steps 0, 6, 12. The format
# warm-up (150 steps of ~10 ms) makes some samples right, so GRPO has groups to learn from.
OVERRIDES = [
    f"--config.num_steps={NUM_STEPS}", "--config.model.num_layers=1",
    "--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
    "--config.model.head_dim=16", "--config.model.mlp_dim=64", "--config.data.batch_size=8",
    "--config.data.max_prompt_len=64", "--config.sampling.prompt_buckets=(64,)",
    "--config.sampling.num_samples=4", "--config.sampling.max_new_tokens=12",
    "--config.warmup.steps=150", "--config.warmup.lr=0.01",
    "--config.checkpoint.every=2", "--config.checkpoint.keep=3",
    "--config.eval.every=6", "--config.eval.num_examples=8", "--config.eval.num_samples=4",
    "--config.optim.max_bad_steps=2", "--config.logging.samples_every=6",
    "--config.logging.samples_contexts=2",
]


def load_config(data_dir, *extra):
    argv = ["prog", f"--config={ROOT / 'configs' / 'tiny.py'}", *OVERRIDES,
            f"--config.data.data_dir={data_dir}", *extra]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def config(data_dir):
    return load_config(data_dir)


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, trainer.train_and_evaluate(config, workdir, progress=False)


def final_state(config, workdir):
    """The newest checkpoint of a workdir, restored."""
    mesh = sharding.make_mesh(config)
    cfg = model_lib.ModelConfig.from_config(config.model)
    shapes = model_lib.param_shapes(cfg)
    p_sh = sharding.param_shardings(mesh, model_lib.logical_axes(cfg), shapes)
    tx = train_step.make_optimizer(config.optim, config.num_steps)
    abstract = train_step.abstract_state(cfg, tx,
                                         train_step.state_shardings(mesh, tx, shapes, p_sh))
    return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).restore(abstract)


def assert_bitwise_equal(a, b):
    for (path, x), y in zip(jax.tree.flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def test_run_logs_checkpoints_and_does_not_recompile(uninterrupted):
    workdir, result = uninterrupted
    assert result.status == "done" and result.step == NUM_STEPS
    # updates applied (a step whose groups all have equal rewards has nothing to learn from)
    assert int(result.state.step) >= NUM_STEPS // 2
    train = metrics_writer.read_metrics(workdir, "train")
    assert [r["step"] for r in train] == list(range(1, NUM_STEPS + 1))
    for r in train:
        assert 0.0 <= r["reward"] <= 1.0 and r["finite"] == 1 and r["bad_steps"] == 0
        assert 0 < r["response_len"] <= 12 and r["tokens_per_second"] > 0
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
    # sampler, rollout and update compiled once each (one prompt bucket), never again
    assert {r["compiles"] for r in train} == {3}
    warm = metrics_writer.read_metrics(workdir, "warmup")
    assert [r["step"] for r in warm] == list(range(-150, 0))
    assert np.mean([r["loss"] for r in warm[-10:]]) < 0.5 * warm[0]["loss"]
    assert np.mean([r["boxed"] for r in train]) > 0.5  # the warm-up taught the answer format
    evals = metrics_writer.read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert all(0 <= r["eval/reasoning/all"] <= 100 for r in evals)
    # rollouts to read: 2 contexts x 4 samples at steps 6 and 12; a reward of 1 only where the
    # box holds a prefix of the true continuation
    shown = metrics_writer.read_samples(workdir)
    assert [(r["step"], r["context_index"]) for r in shown] == [(6, 0), (6, 1), (12, 0), (12, 1)]
    samples = [s for r in shown for s in r["samples"]]
    assert len(samples) == 16 and all(0 < s["tokens"] <= 12 for s in samples)
    for r in shown:
        assert r["context"] and r["target"]
        for s in r["samples"]:
            assert s["reward"] in (0.0, 1.0)
            assert s["reward"] == 0 or r["target"].startswith(s["prediction"])
    assert any(s["prediction"] is not None for s in samples)
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ck.all_steps() == [8, 10, 12]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_steps"] == NUM_STEPS


def test_evaluate_script_reproduces_the_runs_own_eval(config, uninterrupted, tmp_path):
    """scripts/evaluate.py on checkpoint 12 of a run: the positions (the run's eval cache) and
    the samples (trainer.eval_key) of the run's own eval at step 12, so the same numbers."""
    workdir = uninterrupted[0]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"),
         f"--config={ROOT / 'configs' / 'tiny.py'}", *OVERRIDES,
         f"--config.data.data_dir={config.data.data_dir}", f"--checkpoint={workdir}",
         "--step=12", f"--output={tmp_path}", "--noprogress"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest"))  # as conftest sets it
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        result = json.load(f)["results"][0]
    ours = {**result["metrics"], **{f"eval/{k}": v for k, v in result["diagnostics"].items()}}
    assert "eval/mean_response_tokens" in ours  # a sample's length: which samples were drawn
    logged = [r for r in metrics_writer.read_metrics(workdir, "eval") if r["step"] == 12][0]
    assert ours and {k: logged[k] for k in ours} == pytest.approx(ours, abs=1e-9)


def test_a_workdir_of_another_model_is_refused_and_keeps_its_config(config, uninterrupted,
                                                                     tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(uninterrupted[0], workdir)
    before = pathlib.Path(workdir, "config.json").read_text()
    wider = config.copy_and_resolve_references()
    wider.model.mlp_dim = 128
    with pytest.raises(ValueError, match="mlp_dim|up_proj|shape"):
        trainer.train_and_evaluate(wider, workdir, progress=False)
    assert pathlib.Path(workdir, "config.json").read_text() == before
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == \
        [8, 10, 12]  # nothing moved aside


def test_config_json_says_what_a_resume_changed(config, tmp_path, caplog):
    """save_config writes the run's config; a later start with other values warns, key by key."""
    assert trainer.save_config(config, str(tmp_path)) == []
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["sampling"]["prompt_buckets"] == [64] and saved["data"]["batch_size"] == 8
    assert trainer.save_config(config, str(tmp_path)) == []  # the same config: silent
    changed = config.copy_and_resolve_references()
    changed.optim.lr, changed.num_steps = 0.5, 99
    with caplog.at_level("WARNING"):
        assert trainer.save_config(changed, str(tmp_path)) == ["num_steps", "optim.lr"]
    assert f"optim.lr: {config.optim.lr!r} -> 0.5" in caplog.text
    assert f"num_steps: {NUM_STEPS} -> 99" in caplog.text
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["optim"]["lr"] == 0.5  # the newest start's config


def test_resume_after_corrupt_latest_equals_uninterrupted(config, uninterrupted, tmp_path, caplog):
    """Step 12's checkpoint corrupt: falls back to step 10, resumes, ends bitwise equal."""
    workdir, result = uninterrupted
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    # step 12's folder now holds step 10's arrays: valid files with other values than were saved
    ckdir = pathlib.Path(resumed) / "checkpoints"
    shutil.rmtree(ckdir / "12" / "state")
    shutil.copytree(ckdir / "10" / "state", ckdir / "12" / "state")
    again = trainer.train_and_evaluate(config, resumed, progress=False)
    assert "restored arrays differ from what was saved" in caplog.text
    assert "falling back to the previous one" in caplog.text
    assert again.status == "done" and again.step == NUM_STEPS
    assert_bitwise_equal(again.state, result.state)
    assert [r["step"] for r in metrics_writer.read_metrics(resumed, "train")] == \
        list(range(1, NUM_STEPS + 1))


def _wait_for(predicate, proc, log_path, timeout=240.0, poll=0.01):
    t = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}:\n"
                                 + pathlib.Path(log_path).read_text()[-3000:])
        if time.time() - t > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(poll)


def _train_steps(workdir):
    """Steps of the train records in metrics.jsonl so far (a line being written is skipped)."""
    path = os.path.join(workdir, metrics_writer.JSONL)
    steps = []
    if os.path.isfile(path):
        for line in pathlib.Path(path).read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec["kind"] == "train":
                steps.append(rec["step"])
    return steps or [0]


def test_sigterm_saves_and_kill_9_resumes(config, data_dir, uninterrupted, tmp_path):
    """A real process: SIGTERM mid-run -> checkpoint + exit 0; resumed, then kill -9 at once; the
    third start finishes with the uninterrupted run's parameters, bitwise."""
    workdir = str(tmp_path / "killed")
    # conftest's compilation cache: the programs of the in-process runs, and the first start's
    # for the next two (every program cached)
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",  # as conftest sets it here
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"),
           f"--config={ROOT / 'configs' / 'tiny.py'}", *OVERRIDES,
           f"--config.data.data_dir={data_dir}", f"--workdir={workdir}"]
    log_path = str(tmp_path / "train.log")

    def start():
        with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the child
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def finish(proc):
        assert proc.wait(timeout=240) == 0, pathlib.Path(log_path).read_text()[-3000:]
        return pathlib.Path(log_path).read_text()

    proc = start()
    _wait_for(lambda: max(_train_steps(workdir)) >= 1, proc, log_path)
    proc.send_signal(signal.SIGSTOP)  # freeze it wherever it is, then deliver SIGTERM
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out = finish(proc)
    assert "received SIGTERM" in out and "preempted at step" in out
    stopped = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    assert 1 <= stopped < NUM_STEPS and max(_train_steps(workdir)) == stopped

    proc = start()
    _wait_for(lambda: max(_train_steps(workdir)) > stopped, proc, log_path)
    proc.kill()  # SIGKILL: no handler runs, no final save
    proc.wait()

    out = finish(start())
    assert "resumed from step" in out and f"done at step {NUM_STEPS}" in out
    restored = final_state(config, workdir)
    assert restored.step == NUM_STEPS
    assert_bitwise_equal(restored.state, uninterrupted[1].state)
    assert _train_steps(workdir) == list(range(1, NUM_STEPS + 1))
    # the logged rollouts too: each step once, the same samples as the uninterrupted run's
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(metrics_writer.read_samples(workdir)) == \
        strip(metrics_writer.read_samples(uninterrupted[0]))
    # TensorBoard's too: its buffered events are flushed with each step, before a checkpoint
    from test_metrics_writer import tensorboard_scalars
    assert sorted(s for tag, s in tensorboard_scalars(workdir) if tag == "train/reward") == \
        list(range(1, NUM_STEPS + 1))
    # every eval once: one killed during an eval redoes it, a resumed one does not repeat it
    assert [r["step"] for r in metrics_writer.read_metrics(workdir, "eval")] == [0, 6, 12]


def test_killed_in_the_last_eval_redoes_it(data_dir, tmp_path, monkeypatch, caplog):
    """eval.every (5) does not divide num_steps (12), checkpoint.every (4) does: the last
    eval runs before checkpoint 12, so a run killed in it evaluates step 12 on resume. Each
    eval also compiles the shared sampler for a new prompt width: not a training recompile."""
    config = load_config(data_dir, "--config.warmup.steps=0", "--config.eval.every=5",
                         "--config.checkpoint.every=4")
    workdir = str(tmp_path / "run")
    run_eval, kill = trainer.run_eval, [True]

    def killed_at_12(*args, **kwargs):
        params, step, sampler = args[0], args[7], args[8]
        if step == NUM_STEPS and kill[0]:
            raise KeyboardInterrupt("killed in the last eval")
        ones = np.ones((config.data.batch_size, 16 + step), np.int32)  # another prompt bucket
        sampler(params, sampling.Prompts(ones, ones), trainer.step_key(config.seed, step))
        return run_eval(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_eval", killed_at_12)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(config, workdir, progress=False)
    kill[0] = False
    assert trainer.train_and_evaluate(config, workdir, progress=False).step == NUM_STEPS
    assert [r["step"] for r in metrics_writer.read_metrics(workdir, "eval")] == [0, 5, 10, 12]
    compiles = [r["compiles"] for r in metrics_writer.read_metrics(workdir, "train")]
    assert compiles[5] > compiles[4]  # step 6 counts eval 5's sampler variant...
    assert "recompiled" not in caplog.text  # ...and says nothing


def test_sigterm_in_the_warm_up_stops_at_once(config, uninterrupted, tmp_path, monkeypatch):
    """A stop requested during the format warm-up ends the run there, with nothing saved; the
    restart begins afresh and ends as the uninterrupted run."""
    calls = []
    monkeypatch.setattr(trainer.StopFlag, "requested", lambda self: calls.append(1) or
                        len(calls) > 20)
    workdir = str(tmp_path / "run")
    result = trainer.train_and_evaluate(config, workdir, progress=False)
    assert (result.status, result.step, result.state, len(calls)) == ("preempted", 0, None, 21)
    assert not checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
    assert [r["step"] for r in metrics_writer.read_metrics(workdir, "warmup")] == \
        list(range(-150, -130))
    monkeypatch.undo()
    assert trainer.train_and_evaluate(config, workdir, progress=False).step == NUM_STEPS
    assert_bitwise_equal(final_state(config, workdir).state, uninterrupted[1].state)


def test_non_finite_steps_are_skipped_then_stop_the_run(config, uninterrupted, tmp_path):
    """A NaN weight makes every loss non-finite: each update is skipped (state unchanged), counted
    (the counts resume from the checkpoint), and after optim.max_bad_steps in a row the run stops
    without saving."""
    good = final_state(config, uninterrupted[0])
    params = jax.tree.map(lambda x: x, good.state.params)
    params["norm"] = params["norm"].at[0].set(jnp.nan)
    poisoned = good.state._replace(params=params, step=jnp.zeros((), jnp.int32))
    workdir = str(tmp_path / "nan")
    ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    # saved as by a run whose step 4 was its 3rd non-finite step, the 1st in a row
    assert good.meta["bad_steps"] == [0, 0]
    ck.save(4, poisoned, {"data": {"step": 4, "num_examples": good.meta["data"]["num_examples"],
                                   "seed": config.seed}, "bad_steps": [1, 3]})
    ck.close()
    # without DAPO dropping (all rewards are 0 here) every row enters the loss
    no_drop = load_config(config.data.data_dir, "--config.rl.dynamic_sampling=False",
                          "--config.optim.max_bad_steps=3")
    result = trainer.train_and_evaluate(no_drop, workdir, progress=False)
    assert result.status == "bad_steps" and result.step == 6  # the 3rd in a row, counting step 4
    assert_bitwise_equal(result.state, poisoned)
    train = metrics_writer.read_metrics(workdir, "train")
    assert [(r["step"], r["finite"], r["applied"], r["bad_steps"]) for r in train] == \
        [(5, 0, 0, 4), (6, 0, 0, 5)]
    # the step-6 checkpoint (checkpoint.every=2) is not written: the last good one stays newest
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [4]


def test_starts_from_an_hf_checkpoint(config, data_dir, tmp_path):
    """config.use_hf_checkpoint (as configs/hf_checkpoint.py): the folder's architecture, a
    Llama 3 RoPE scaling included, its weights and its tokenizer are the run's start; with lr 0
    the one update leaves them bitwise as loaded. A config that differs fails before compiling."""
    from rpt_jax import config as config_lib
    from rpt_jax import hf, rope
    from rpt_jax import tokenizer as tokenizer_lib
    cfg = dataclasses.replace(model_lib.ModelConfig.from_config(config.model), rope_scaling=(
        rope.canonical({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})))
    params = model_lib.init(cfg, jax.random.key(7))
    tok_dir = str(tmp_path / "tok")
    tokenizer_lib.load_tokenizer(config).save(tok_dir)
    folder = str(hf.save_params(params, cfg, tmp_path / "hf", tokenizer_dir=tok_dir))
    hf_config = config_lib.use_hf_checkpoint(
        load_config(data_dir, "--config.num_steps=1", "--config.warmup.steps=0",
                    "--config.eval.every=0", "--config.optim.lr=0.0"), folder)
    assert (hf_config.model.preset, hf_config.model.rope_scaling) == ("hf_checkpoint",
                                                                     cfg.rope_scaling)
    # an eval set a killed run left, scored by another model: a fresh start drops it
    stale = (tmp_path / "run" / "eval" /
             "evalset-validation-the_policy_at_its_first_evaluation-0.npz")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    result = trainer.train_and_evaluate(hf_config, str(tmp_path / "run"), progress=False)
    assert result.status == "done" and result.step == 1
    assert_bitwise_equal(result.state.params, params)
    assert not stale.exists()

    wrong = load_config(data_dir, f"--config.model.hf_checkpoint={folder}",
                        "--config.model.mlp_dim=128")
    with pytest.raises(ValueError, match="model.mlp_dim=128 but the checkpoint has 64, "
                                         "model.rope_scaling='' but the checkpoint has '{"):
        trainer.train_and_evaluate(wrong, str(tmp_path / "wrong"), progress=False)
    # the model folder given as a workdir: its config.json would be replaced by the run's
    before = (tmp_path / "hf" / "config.json").read_text()
    with pytest.raises(ValueError, match="is a Hugging Face model's config: .* is a model "
                                         "folder, not a run's workdir"):
        trainer.train_and_evaluate(hf_config, folder, progress=False)
    assert (tmp_path / "hf" / "config.json").read_text() == before


def test_export_hf_writes_the_runs_params_for_transformers(config, data_dir, uninterrupted,
                                                           tmp_path):
    """scripts/export_hf.py: the latest checkpoint's params (or --step's, in --dtype) as an HF
    folder: hf.load_params reads them back bitwise, transformers gives our logits, the run's
    tokenizer comes along, scripts/evaluate.py reads it (standard accuracy as the run's last
    eval), and a missing step is named."""
    import torch
    import transformers

    from rpt_jax import hf
    from rpt_jax import tokenizer as tokenizer_lib
    workdir, _ = uninterrupted
    cmd = [sys.executable, str(ROOT / "scripts" / "export_hf.py"),
           f"--config={ROOT / 'configs' / 'tiny.py'}", *OVERRIDES,
           f"--config.data.data_dir={data_dir}", f"--workdir={workdir}"]

    def export(out, *extra):
        return subprocess.run(cmd + [f"--out={out}", *extra], capture_output=True, text=True,
                              timeout=240)

    done = export(tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote step {NUM_STEPS} of {workdir}" in done.stdout
    cfg = model_lib.ModelConfig.from_config(config.model)
    params = hf.load_params(tmp_path / "hf", cfg)
    assert_bitwise_equal(params, final_state(config, workdir).state.params)
    text = "12+34=46\n"
    assert (tokenizer_lib.Tokenizer.from_dir(tmp_path / "hf").encode(text)
            == trainer.load_run_tokenizer(config, workdir).encode(text))
    ids = np.arange(24, dtype=np.int64).reshape(2, 12) * 7 % cfg.vocab_size
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(ids)).logits.numpy()
    ours = model_lib.forward(params, jnp.asarray(ids, jnp.int32), cfg)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5, rtol=0)

    # scripts/evaluate.py on the exported folder: the run's last eval positions and accuracy
    evaluate = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), *cmd[2:-1],
                f"--checkpoint={tmp_path / 'hf'}", f"--output={tmp_path / 'eval'}",
                "--progress=false"]
    done = subprocess.run(evaluate, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "eval" / "results.json").read_text())["results"][0]["summary"]
    last = [r for r in metrics_writer.read_metrics(workdir, "eval") if r["step"] == NUM_STEPS][0]
    assert got["all"]["count"] == config.eval.num_examples  # the run's eval positions:
    assert got["all"]["standard"] == last["eval/standard/all"]  # the same argmax accuracy
    assert 0 <= got["all"]["reasoning"] <= 100  # (sampled with another key than the hook's)

    from rpt_jax import evaluation
    first = evaluation.checkpoint_steps(workdir)[0]
    done = export(tmp_path / "hf16", f"--step={first}", "--dtype=bfloat16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"
    missing = export(tmp_path / "none", "--step=5")
    assert missing.returncode != 0 and "no checkpoint step 5" in missing.stderr

    # what an export would lose or get wrong is refused before any work
    for out, extra, error in [
            (tmp_path / "hf16", (), "is not empty (['config.json', "),
            (workdir, ("--overwrite",), "is or holds the workdir; write the export elsewhere"),
            (tmp_path / "new", ("--config.data.template=v0",),
             "the config differs from the run's " + f"{workdir}/config.json in ['data.template']")]:
        refused = export(out, *extra)
        assert refused.returncode != 0 and error in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "new").exists()
    (tmp_path / "hf16" / "generation_config.json").write_text("{}")  # another model's
    done = export(tmp_path / "hf16", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_bitwise_equal(hf.load_params(tmp_path / "hf16", cfg), params)
    assert not (tmp_path / "hf16" / "generation_config.json").exists()
    assert not list(tmp_path.glob(".hf16.tmp-*"))


def test_export_hf_takes_data_tokenizer_over_the_checkpoints(config, tmp_path, monkeypatch):
    """scripts/export_hf.py for a run from model.hf_checkpoint with another data.tokenizer: the
    folder holds the run's tokenizer, and the checkpoint's generation_config.json with the run
    tokenizer's end ids (checkpoint reads stubbed: no training run)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import export_hf

    from rpt_jax import evaluation, hf
    from rpt_jax import tokenizer as tokenizer_lib
    cfg = model_lib.ModelConfig.from_config(config.model)
    params = model_lib.init(cfg, jax.random.key(0))
    theirs = tokenizer_lib.builtin_tokenizer(cfg.vocab_size)
    theirs.save(tmp_path / "tok_a")
    base = hf.save_params(params, cfg, tmp_path / "base", tokenizer_dir=tmp_path / "tok_a")
    (base / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [theirs.eos_id, 5], "temperature": 0.6}))
    tokenizer_lib.builtin_tokenizer(cfg.vocab_size - 64).save(tmp_path / "tok_b")
    run = config.copy_and_resolve_references()
    run.model.hf_checkpoint = str(base)
    run.data.tokenizer = str(tmp_path / "tok_b" / "tokenizer.json")
    monkeypatch.setattr(evaluation, "checkpoint_steps", lambda workdir: [4])
    monkeypatch.setattr(evaluation, "load_workdir_params", lambda *args: params)
    folder, step = export_hf.export(run, str(tmp_path / "run"), str(tmp_path / "out"))
    ours = trainer.load_run_tokenizer(run, str(tmp_path / "run"))
    got = tokenizer_lib.Tokenizer.from_dir(folder)
    assert step == 4 and got.vocab_size == ours.vocab_size == cfg.vocab_size - 64
    assert ([got.token_bytes(i) for i in range(got.vocab_size)]
            == [ours.token_bytes(i) for i in range(ours.vocab_size)])
    assert got.end_ids == ours.end_ids == (ours.eos_id,)
    assert json.loads((folder / "generation_config.json").read_text()) == {
        "eos_token_id": [ours.eos_id], "temperature": 0.6}


def test_export_hf_guards_what_it_would_replace(config, tmp_path, monkeypatch):
    """export_hf.py's --out may not be, hold or sit in what a run needs (an --out inside the
    workdir is fine); a link is followed; a run's config.json from before a key existed reads
    as that key's default (checkpoint reads stubbed: no training run)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import export_hf

    from rpt_jax import evaluation, hf
    run = config.copy_and_resolve_references()
    run.model.hf_checkpoint = str(tmp_path / "base")
    work = tmp_path / "run"
    for out, error in [(tmp_path, "is or holds the workdir"), (work, "is or holds the workdir"),
                       (work / "checkpoints" / "x", "is inside the checkpoints folder"),
                       (tmp_path / "base" / "x", "is inside model.hf_checkpoint"),
                       (work / "hf", None)]:
        if error is None:
            export_hf.check_out(str(out), str(work), run, overwrite=True)
        else:
            with pytest.raises(ValueError, match=error):
                export_hf.check_out(str(out), str(work), run, overwrite=True)

    cfg = model_lib.ModelConfig.from_config(config.model)
    params = model_lib.init(cfg, jax.random.key(0))
    monkeypatch.setattr(evaluation, "checkpoint_steps", lambda workdir: [2])
    monkeypatch.setattr(evaluation, "load_workdir_params", lambda *args: params)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    folder, _ = export_hf.export(config, str(work), str(tmp_path / "link"))
    assert folder == tmp_path / "target" and (tmp_path / "link").is_symlink()
    assert_bitwise_equal(hf.load_params(tmp_path / "link", cfg), params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "run", "target"]  # no tmp left

    old = json.loads(config.to_json_best_effort())
    del old["model"]["qk_norm"], old["model"]["rope_scaling"]  # keys added after a run began
    (work / "config.json").write_text(json.dumps(old))
    trainer.check_run_config(config, str(work))
    changed = config.copy_and_resolve_references()
    changed.model.qk_norm = True
    with pytest.raises(ValueError, match=r"config\.json in \['model\.qk_norm'\], which change "
                                         r"what its checkpoints mean"):
        trainer.check_run_config(changed, str(work))


def test_document_grouped_run_samples_each_document_once(data_dir, tmp_path, monkeypatch):
    """data.contexts_per_doc=2: the sampler gets one prefix row per document (8 for 16
    contexts), the run trains, and nothing recompiles; step 1 is traced (logging.profile_*)."""
    seen, reserved = [], []
    make = trainer.sampling.make_sampler

    def spy(*args, **kwargs):
        reserved.append(kwargs["reserved_bytes"])
        run = make(*args, **kwargs)

        def wrapped(params, prompts, rng):
            seen.append((prompts.check(), prompts.visible is not None))
            return run(params, prompts, rng)
        wrapped.jitted = run.jitted
        return wrapped

    monkeypatch.setattr(trainer.sampling, "make_sampler", spy)
    shared = []  # the update's forward: each context's prompt once for its G samples
    real = trainer.train_step.model.hidden_states_shared_prompt
    monkeypatch.setattr(trainer.train_step.model, "hidden_states_shared_prompt",
                        lambda *a: shared.append(a[-2:]) or real(*a))
    grouped = load_config(data_dir, "--config.data.contexts_per_doc=2",
                          "--config.data.batch_size=16", "--config.num_steps=2",
                          "--config.warmup.steps=0", "--config.eval.every=0",
                          "--config.logging.profile_start=1", "--config.logging.profile_steps=1")
    workdir = str(tmp_path / "grouped")
    result = trainer.train_and_evaluate(grouped, workdir, progress=False)
    assert result.status == "done" and result.step == 2
    # logging.profile_start=1: a jax.profiler trace of step 1
    assert list(pathlib.Path(workdir, "profile").glob("plugins/profile/*/*.xplane.pb"))
    # the sampler's memory check leaves room for Adam's two float32 moments (and its counts),
    # whole on each device of this data-parallel mesh
    n = model_lib.num_params(model_lib.ModelConfig.from_config(grouped.model))
    d = jax.device_count()
    assert 8 * n * d <= reserved[0] <= (8 * n + 64) * d, (reserved, n)
    assert len(seen) == 2 and all(is_grouped for _, is_grouped in seen)
    assert {(d, b) for (d, _, b, _), _ in seen} == {(8, 16)}
    assert shared and shared[0][0] == grouped.sampling.num_samples
    train = metrics_writer.read_metrics(workdir, "train")
    assert {r["compiles"] for r in train} == {3}
    assert all(np.isfinite(r["loss"]) and 0 < r["response_len"] <= 12 for r in train)


def test_an_update_that_cannot_fit_stops_before_any_weights_load(config, tmp_path,
                                                                monkeypatch):
    """Devices too small for the update: the run stops in its memory check, naming the keys
    to change, before it builds data, loads weights or writes anything but the tokenizer (read
    first: the stop strings and the prompt template are checked before the compile)."""
    monkeypatch.setattr(trainer.sharding, "device_bytes", lambda mesh: 1000 * mesh.devices.size)
    monkeypatch.setattr(trainer, "initial_params", lambda *a: pytest.fail("weights loaded"))
    workdir = tmp_path / "small"
    with pytest.raises(ValueError, match=r"rl.micro_batches=1 slices .* needs .* GiB a device .* "
                                         r"a device has 9.31e-07 GiB; raise rl.micro_batches"):
        trainer.train_and_evaluate(config, str(workdir), progress=False)
    assert os.listdir(workdir) == ["tokenizer"]  # no data, checkpoint or metrics yet


def test_no_proxy_for_an_entropy_filter_greedy_or_a_url_workdir_stop_before_compiling(
        config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "fit_update", lambda *a: pytest.fail("compiled"))
    filtered = config.copy_and_resolve_references()
    filtered.data.entropy_threshold = 0.5
    with pytest.raises(ValueError, match="entropy_threshold=0.5 needs data.proxy_checkpoint"):
        trainer.train_and_evaluate(filtered, str(tmp_path / "run"), progress=False)
    stops = config.copy_and_resolve_references()
    stops.sampling.stop_strings = ("</s>",)  # three tokens of the built-in vocabulary
    with pytest.raises(ValueError, match="sampling.stop_strings: '</s>' is not one token"):
        trainer.train_and_evaluate(stops, str(tmp_path / "run"), progress=False)
    greedy = config.copy_and_resolve_references()
    greedy.sampling.greedy = True
    with pytest.raises(ValueError, match="sampling.greedy=True makes a context's"):
        trainer.train_and_evaluate(greedy, str(tmp_path / "run"), progress=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir gs://bucket/run: a URL"):
        trainer.train_and_evaluate(config, "gs://bucket/run", progress=False)
    assert not os.path.exists(tmp_path / "gs:")
    # an HF checkpoint with a tensor missing: named from the file headers, before compiling
    from rpt_jax import hf
    from safetensors.numpy import load_file, save_file
    cfg = model_lib.ModelConfig.from_config(config.model)
    folder = hf.save_params(jax.device_get(model_lib.init(cfg, jax.random.key(0))), cfg,
                            tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for key in ("model.hf_checkpoint", "data.proxy_checkpoint", "eval.proxy_checkpoint"):
        broken = config.copy_and_resolve_references()
        section, name = key.split(".")
        broken[section][name] = str(folder)
        with pytest.raises(KeyError, match=r"tensor\(s\) missing from the checkpoint"):
            trainer.train_and_evaluate(broken, str(tmp_path / "run"), progress=False)
    broken.eval.every = 0  # no evals: the eval proxy is never read, so not checked
    with pytest.raises(pytest.fail.Exception, match="compiled"):  # on to the compile
        trainer.train_and_evaluate(broken, str(tmp_path / "run"), progress=False)


def test_zero_micro_batches_means_the_fewest_that_fit(config):
    """rl.micro_batches=0: fit_update bisects the valid counts (32 rows over 8 devices: 1, 2,
    4) for the fewest whose update fits a device's memory."""
    mesh = sharding.make_mesh(config)
    long = config.copy_and_resolve_references()
    long.sampling.max_new_tokens = 192  # activations, which micro-batches cut, dominate the peak
    peaks = {}
    for m in (1, 2, 4):
        fixed = long.copy_and_resolve_references()
        fixed.rl.micro_batches = m
        peaks[m] = trainer.fit_update(fixed, mesh)[2]
    assert peaks[1] > peaks[2] > peaks[4], peaks
    auto = long.copy_and_resolve_references()
    auto.rl.micro_batches = 0
    for limit, want in [(None, 1), (peaks[1] - 1, 2), (peaks[4], 4)]:
        chosen, parts, peak = trainer.fit_update(auto, mesh, limit)
        assert (chosen.rl.micro_batches, peak) == (want, peaks[want]), limit
        assert parts[4].check_memory  # the update of that count, compiled already
    assert auto.rl.micro_batches == 0  # the caller's config is left as it was
    with pytest.raises(train_step.DoesNotFit, match=r"none of \[1, 2, 4\] fits; the most: .*"
                                                    r"rl.micro_batches=4 slices"):
        trainer.fit_update(auto, mesh, peaks[4] - 1)


def test_kl_to_the_starting_policy_and_its_resume(data_dir, tmp_path):
    """rl.kl_coef > 0: the reference is the policy RL starts from (after the warm-up), saved in
    <workdir>/reference; the KL is 0 at the first update (policy == reference) and grows after;
    a run stopped at step 2 and resumed to 4 ends bitwise equal to an uninterrupted one; a fresh
    start replaces a reference it finds."""
    kl = ("--config.rl.kl_coef=0.5", "--config.rl.dynamic_sampling=False", "--config.eval.every=0")
    whole = str(tmp_path / "whole")
    result = trainer.train_and_evaluate(load_config(data_dir, *kl, "--config.num_steps=4"),
                                        whole, progress=False)
    assert result.status == "done" and os.path.isdir(os.path.join(whole, "reference", "0"))
    train = metrics_writer.read_metrics(whole, "train")
    assert abs(train[0]["kl_ref"]) < 1e-6 < train[-1]["kl_ref"]
    parts = str(tmp_path / "parts")
    for steps in (2, 4):
        trainer.train_and_evaluate(load_config(data_dir, *kl, f"--config.num_steps={steps}"),
                                   parts, progress=False)
    assert_bitwise_equal(final_state(load_config(data_dir, *kl, "--config.num_steps=4"),
                                     parts).state, result.state)
    # a fresh start over a reference left by a run killed before its first checkpoint (here
    # another run's: the warmed-up policy) makes its own: KL 0 at its first update
    fresh = tmp_path / "fresh"
    shutil.copytree(os.path.join(whole, "reference"), fresh / "reference")
    trainer.train_and_evaluate(load_config(data_dir, *kl, "--config.num_steps=1",
                                           "--config.warmup.steps=0"), str(fresh), progress=False)
    assert abs(metrics_writer.read_metrics(str(fresh), "train")[0]["kl_ref"]) < 1e-6
    # switched on for a run that has no reference: a clear error before any step
    plain = str(tmp_path / "plain")
    trainer.train_and_evaluate(load_config(data_dir, "--config.num_steps=2",
                                           "--config.warmup.steps=0", "--config.eval.every=0"),
                               plain, progress=False)
    with pytest.raises(ValueError, match="holds no reference policy"):
        trainer.train_and_evaluate(load_config(data_dir, *kl, "--config.num_steps=4"), plain,
                                   progress=False)
