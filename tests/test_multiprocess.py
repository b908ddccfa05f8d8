"""The multi-process path for real: scripts/train.py run as two processes (jax.distributed on
localhost, gloo CPU collectives, 4 devices each, every process feeding its half of each batch)
trains like one process with 8 devices: the same metrics, corpus, checkpoints and parameters;
then the pair resumes from its last checkpoint."""
import filecmp
import glob
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from rpt_jax import checkpoint, corpora, evaluation, metrics_writer, sharding, train_step, trainer
from rpt_jax import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS, RESUMED_STEPS = 4, 6
# configs/tiny.py shrunk (as tests/test_trainer.py): 1 layer of width 32, 8 contexts x 4 samples
# of up to 12 tokens, checkpoints every 2 steps, evals at steps 0 and 4. 60 warm-up steps make a
# few samples right, so some RL steps apply an update (with 20 none does: all rewards are 0).
OVERRIDES = [
    "--config.model.num_layers=1", "--config.model.hidden_size=32", "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
    "--config.data.batch_size=8", "--config.data.max_prompt_len=64",
    "--config.sampling.prompt_buckets=(64,)", "--config.sampling.num_samples=4",
    "--config.sampling.max_new_tokens=12", "--config.warmup.steps=60", "--config.warmup.lr=0.01",
    "--config.checkpoint.every=2", "--config.checkpoint.keep=3", "--config.eval.every=4",
    "--config.eval.num_examples=8", "--config.eval.num_samples=4",
]
TIMEOUT = 240.0  # seconds for one two-process run
# Float results need not match exactly: gloo all-reduces the two processes' partial sums where
# one process reduces its 8 devices in another order, so gradients differ in their last bits,
# and Adam, which divides each gradient element by its own scale, turns that into weight
# differences: observed 1.2e-5 after the warm-up (60 steps at lr 0.01), a relative 3e-6 in
# warm-up losses and up to 1.4e-3 in RL grad norms after an update. So a token drawn where the
# two runs' probabilities differ in their fifth digit may come out differently: observed for 1
# of a step's 32 samples (an AMD EPYC at step 1; on other machines only after an RL update).
# Counts and the schedule must match exactly; what the samples decide, up to FLIPS samples.
EXACT = ("finite", "bad_steps", "lr")
FLIPS = 2
_SAMPLES, _CONTEXTS, _MAX_LEN = 32, 8, 12  # a step's samples (8 contexts x G = 4), tokens each
SLACK = {k: FLIPS / _SAMPLES for k in ("reward", "accuracy", "boxed", "think_end", "truncated")}
SLACK.update(pass_at_g=FLIPS / _CONTEXTS, kept_frac=FLIPS / _CONTEXTS,
             response_len=FLIPS * _MAX_LEN / _SAMPLES, sampled_tokens=FLIPS * _MAX_LEN)
RTOL = {"warmup": 1e-4, "train": 1e-2}  # of loss and grad_norm
# The weights: each tensor's gap between the two runs is a small part of how far the warm-up
# moved it from the shared random init (an element whose gradient is near zero may take either
# sign in the two runs, and Adam moves it by about lr whatever the gradient's size: observed
# 1.2e-5 at most on one machine, 3.7e-4 on an AMD EPYC, against moves of about 0.1).
WEIGHTS_RTOL = 0.05


def load_config(*extra):
    argv = ["prog", f"--config={ROOT / 'configs' / 'tiny.py'}", *OVERRIDES, *extra]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, num_steps, log_dir, jax_cache) -> list[str]:
    """scripts/train.py as processes 0 and 1 of one run; returns their logs (`run_pair`).
    jax_cache: a persistent compilation cache folder (the resumed run compiles nothing)."""
    return run_pair(["scripts/train.py", f"--config={ROOT / 'configs' / 'tiny.py'}", *OVERRIDES,
                     f"--config.num_steps={num_steps}", f"--workdir={workdir}"],
                    log_dir, jax_cache)


def run_pair(args, log_dir, jax_cache) -> list[str]:
    """`python *args --distributed ...` as processes 0 and 1; returns their logs. Both must
    exit 0; when one fails (or time runs out) the other is killed: blocked in a collective with
    the failed one, it would wait for the coordination service's heartbeat timeout (100 s)."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_DEFAULT_MATMUL_PRECISION="highest",  # as conftest sets it in this process
               JAX_COMPILATION_CACHE_DIR=str(jax_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, str(ROOT / args[0]), *args[1:], "--distributed",
           f"--coordinator_address=localhost:{port}", "--num_processes=2",
           "--cpu_collectives=gloo"]
    logs = [pathlib.Path(log_dir) / f"process{i}.log" for i in (0, 1)]
    procs = []
    for i, path in enumerate(logs):
        with open(path, "w") as f:  # a file, not a pipe: a full pipe would block the child
            procs.append(subprocess.Popen(cmd + [f"--process_id={i}"], env=env, stdout=f,
                                          stderr=subprocess.STDOUT))
    deadline = time.time() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.time() + 5)  # time to log what it was doing
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    out = [path.read_text() for path in logs]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes} (negative: killed)\n" + "\n".join(
        f"--- process {i} ---\n{_tail(text)}" for i, text in enumerate(out))
    return out


def _tail(log: str, lines: int = 25) -> str:
    """The end of a log without its progress bars."""
    keep = [x for x in log.replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]
    return "\n".join(keep[-lines:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process workdir, its two logs, one-process workdir, the pair's compilation cache):
    the same config, the one-process run trained in this test process (conftest's 8 CPU
    devices) while the pair runs."""
    two = tmp_path_factory.mktemp("two_processes")
    one = str(tmp_path_factory.mktemp("one_process"))
    logs = {}
    pair = threading.Thread(target=lambda: logs.update(
        out=_catch(run_two_processes, str(two / "work"), NUM_STEPS, two, two / "jax_cache")),
        daemon=True)
    pair.start()
    result = trainer.train_and_evaluate(load_config(f"--config.num_steps={NUM_STEPS}"), one,
                                        progress=False)
    pair.join()
    if isinstance(logs["out"], BaseException):
        raise logs["out"]
    assert result.status == "done" and result.step == NUM_STEPS
    return str(two / "work"), logs["out"], one, two / "jax_cache"


def _catch(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # re-raised in the fixture's thread
        return e


def _model(num_steps):
    """(config, mesh, ModelConfig, param shardings) on this process's 8-device mesh."""
    config = load_config(f"--config.num_steps={num_steps}")
    mesh = sharding.make_mesh(config)
    cfg = model_lib.ModelConfig.from_config(config.model)
    shapes = model_lib.param_shapes(cfg)
    return config, mesh, cfg, sharding.param_shardings(mesh, model_lib.logical_axes(cfg), shapes)


def restore(workdir, num_steps):
    """(saved steps, the newest checkpoint of a workdir restored onto this process's mesh)."""
    config, mesh, cfg, p_sh = _model(num_steps)
    shapes = model_lib.param_shapes(cfg)
    tx = train_step.make_optimizer(config.optim, config.num_steps)
    abstract = train_step.abstract_state(cfg, tx,
                                         train_step.state_shardings(mesh, tx, shapes, p_sh))
    ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ck.all_steps(), ck.restore(abstract)
    finally:
        ck.close()


def test_two_processes_train_like_one(runs):
    two, (log0, log1), one, _ = runs
    # metrics: the same steps; samples and rewards up to FLIPS samples; losses equal up to float
    # reduction order
    for kind in ("warmup", "train", "eval"):
        a, b = metrics_writer.read_metrics(two, kind), metrics_writer.read_metrics(one, kind)
        assert [r["step"] for r in a] == [r["step"] for r in b], kind
        for ra, rb in zip(a, b):
            if kind == "eval":  # the same eval set (counts by difficulty); its samples may
                # differ as the train steps' may (observed: 1 of 32 at step 0 on an AMD EPYC)
                exact = [k for k in rb if k.startswith("eval/count/")]
            else:
                exact = [k for k in EXACT if k in rb]
                for k in SLACK.keys() & rb.keys():
                    assert abs(ra[k] - rb[k]) <= SLACK[k] + 1e-9, (kind, ra["step"], k)
            assert {k: ra[k] for k in exact} == {k: rb[k] for k in exact}, (kind, ra["step"])
            flipped = any(ra[k] != rb[k] for k in SLACK.keys() & rb.keys())
            for k in ("loss", "grad_norm"):
                if k in rb and not flipped:  # other samples, another loss
                    np.testing.assert_allclose(ra[k], rb[k], rtol=RTOL[kind], atol=1e-5,
                                               err_msg=f"{kind} step {ra['step']} {k}")
    train = metrics_writer.read_metrics(one, "train")
    assert [r["step"] for r in train] == list(range(1, NUM_STEPS + 1))
    assert any(r["applied"] for r in train)  # some update ran, so the params comparison means it
    assert [r["step"] for r in metrics_writer.read_metrics(one, "eval")] == [0, NUM_STEPS]

    # the corpus: built once, by process 0 (the builder logs its split sizes only when it
    # generates), in the shared workdir, with the one-process build's documents (the files
    # themselves differ in a header field)
    built = re.compile(r"rpt_synthetic_arithmetic: \{.*\} documents")
    assert len(built.findall(log0)) == 1 and not built.findall(log1)
    versions = glob.glob(os.path.join(two, "tfds", "rpt_synthetic_arithmetic", "*", "*"))
    assert [os.path.basename(d) for d in versions] == ["1.0.0"]  # no half-built folder left
    config = load_config()
    for split in corpora.SPLITS:
        docs = [list(corpora.load_corpus(config, split, os.path.join(w, "tfds")))
                for w in (two, one)]
        assert docs[0] == docs[1] and docs[0], split
    assert filecmp.cmp(os.path.join(two, "tokenizer", "tokenizer.json"),
                       os.path.join(one, "tokenizer", "tokenizer.json"), shallow=False)

    # checkpoints: the same steps and data-iterator states; the weights after the warm-up
    # (step 0) as WEIGHTS_RTOL says, and at the end also within the RL updates' reach: an Adam
    # step moves a weight by at most about lr (|m_hat / sqrt(v_hat)| <= 1 in its first steps), and
    # a gradient element near zero may take either sign in the two runs
    steps_two, got = restore(two, NUM_STEPS)
    steps_one, want = restore(one, NUM_STEPS)
    assert steps_two == steps_one == [0, 2, 4]
    assert got.step == want.step == NUM_STEPS and got.meta == want.meta
    trains = [metrics_writer.read_metrics(w, "train") for w in (two, one)]
    assert [int(got.state.step), int(want.state.step)] == [sum(r["applied"] for r in t)
                                                           for t in trains]
    rl_reach = 2 * sum(b["lr"] for a, b in zip(*trains) if a["applied"] or b["applied"])
    config, _, cfg, p_sh = _model(NUM_STEPS)
    init = trainer.initial_params(config, cfg, p_sh)  # where both runs started
    warmed = [evaluation.load_workdir_params(w, 0, cfg, p_sh) for w in (two, one)]
    for name, a, b, reach in [("step 0", *warmed, 0.0),
                              ("final", got.state.params, want.state.params, rl_reach)]:
        for (path, x), y, x0 in zip(jax.tree.flatten_with_path(a)[0], jax.tree.leaves(b),
                                    jax.tree.leaves(init)):
            x, y, x0 = (np.asarray(v, np.float64) for v in (x, y, x0))
            gap, moved = np.linalg.norm(x - y), np.linalg.norm(y - x0)
            assert gap <= WEIGHTS_RTOL * moved + reach * np.sqrt(x.size), \
                (name, jax.tree_util.keystr(path), gap, moved)


def test_two_processes_resume(runs, tmp_path):
    """The pair, rerun with num_steps=6 on a copy of its workdir, resumes from step 4. One
    process's cached eval set is gone: both build it afresh (one loading its own while the
    other scores would hang)."""
    workdir = str(tmp_path / "work")
    shutil.copytree(runs[0], workdir)
    cached = sorted(glob.glob(os.path.join(workdir, "eval", "evalset-*.npz")))
    assert len(cached) == 2  # one per process
    os.remove(cached[0])
    out = run_two_processes(workdir, RESUMED_STEPS, tmp_path, runs[3])
    for log in out:
        assert "resumed from step 4" in log and f"done at step {RESUMED_STEPS}" in log
        assert "eval set saved to" in log and "eval set loaded" not in log
    before = metrics_writer.read_metrics(runs[0], kind=None)
    after = metrics_writer.read_metrics(workdir, kind=None)
    assert after[:len(before)] == before  # the first run's records kept, the new ones appended
    assert [(r["kind"], r["step"]) for r in after[len(before):]] == \
        [("train", 5), ("train", 6), ("eval", 6)]
    steps, restored = restore(workdir, RESUMED_STEPS)
    assert steps == [2, 4, 6] and restored.step == RESUMED_STEPS
    assert restored.meta["data"]["step"] == RESUMED_STEPS


def test_batch_rows_follow_the_mesh_not_the_process_order(tmp_path):
    """tests/multihost_rows.py in two processes of 2 CPU devices each: meshes whose devices
    interleave the hosts (as TPU slices order them) get each host's rows where its devices are."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    logs = [tmp_path / f"process{i}.log" for i in (0, 1)]
    procs = []
    for i, path in enumerate(logs):
        with open(path, "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "multihost_rows.py"), str(i), str(port)],
                env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    out = [path.read_text() for path in logs]
    assert codes == [0, 0], "\n".join(f"--- process {i} ---\n{_tail(t)}" for i, t in enumerate(out))
    assert [f"ok {i}" in t for i, t in enumerate(out)] == [True, True]


def test_two_processes_evaluate_like_the_runs_eval(runs, tmp_path):
    """scripts/evaluate.py --distributed on the pair's last checkpoint: the pair's cached eval
    set (one per process) and eval key give the standard accuracy its eval hook logged, and
    process 0 alone writes the results."""
    workdir = str(tmp_path / "work")
    shutil.copytree(runs[0], workdir)
    out = run_pair(["scripts/evaluate.py", f"--config={ROOT / 'configs' / 'tiny.py'}",
                    *OVERRIDES, f"--checkpoint={workdir}", f"--output={tmp_path / 'eval'}",
                    "--progress=false"], tmp_path, runs[3])
    assert ["wrote " in log for log in out] == [True, False]
    assert all("eval set loaded" in log for log in out)
    got = json.loads((tmp_path / "eval" / "results.json").read_text())["results"][0]
    last = [r for r in metrics_writer.read_metrics(runs[0], "eval") if r["step"] == NUM_STEPS]
    assert got["step"] == NUM_STEPS
    assert got["summary"]["all"]["count"] == last[0]["eval/count/all"]
    assert got["summary"]["all"]["standard"] == last[0]["eval/standard/all"]
