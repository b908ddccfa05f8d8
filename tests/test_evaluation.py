"""Evaluation: metric math against plain Python / numpy, nested splits, the eval-set cache, reports,
and `evaluate` on a tiny model against an independent per-row forward and the reference reward."""
import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from rpt_jax import corpora, evaluation, model, reward, sampling, sharding
from rpt_jax.config import base_config
from rpt_jax.tokenizer import builtin_tokenizer

G = 4


# ----------------------------------------------------------------------------- pure math

@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 3), st.just(float("nan"))), min_size=1, max_size=40))
def test_split_membership_is_nested(entropy):
    masks = evaluation.split_masks(entropy, (0.5, 1.0, 1.5))
    assert list(masks) == ["all", "easy", "medium", "hard"]
    e = np.array(entropy)
    assert masks["all"].all()
    assert np.all(masks["hard"] <= masks["medium"]) and np.all(masks["medium"] <= masks["easy"])
    for name, t in (("easy", 0.5), ("medium", 1.0), ("hard", 1.5)):
        assert masks[name].tolist() == [bool(x > t) for x in entropy]  # NaN is in no split
    assert not masks["easy"][np.isnan(e)].any()


def test_split_thresholds_must_increase_and_other_counts_are_named():
    with pytest.raises(ValueError, match="increasing"):
        evaluation.split_masks([1.0], (1.0, 0.5, 1.5))
    assert list(evaluation.split_masks([1.0], (0.7, 2.0))) == ["all", "entropy>0.7", "entropy>2"]


def test_stop_strings_are_single_tokens():
    """Each sampling.stop_strings entry is one token id; text of several tokens is refused (the
    sampler stops on ids), not dropped."""
    tok, config = builtin_tokenizer(512), base_config("tiny")
    config.sampling.stop_strings = ("<|im_end|>",)
    assert evaluation.stop_ids(config, tok) == tuple(sorted(
        {*tok.end_ids, tok.token_to_id("<|im_end|>")}))
    assert len(evaluation.stop_ids(config, tok)) == len(tok.end_ids) + 1
    config.sampling.stop_strings = ("<|im_end|>", "</s>")
    with pytest.raises(ValueError, match=r"sampling.stop_strings: '</s>' is not one token of"):
        evaluation.stop_ids(config, tok)


def test_pass_at_k_matches_subset_enumeration():
    rng = np.random.default_rng(0)
    correct = rng.random((20, 5)) < 0.3
    for k in range(1, 6):
        brute = [np.mean([any(row[j] for j in subset)
                          for subset in itertools.combinations(range(5), k)]) for row in correct]
        np.testing.assert_allclose(evaluation.pass_at_k(correct, k), brute)
    assert evaluation.pass_at_k(correct, 5).tolist() == [float(any(r)) for r in correct]
    with pytest.raises(ValueError, match="k=6"):
        evaluation.pass_at_k(correct, 6)


def test_summary_and_reports_hold_the_numbers(tmp_path):
    entropy = np.array([0.1, 0.7, 1.2, 2.0, np.nan])
    standard = np.array([True, False, True, True, False])
    rewards = np.array([[1, 0], [0, 0], [1, 1], [0, 1], [0, 0]], np.float32)
    per = evaluation.position_metrics(standard, rewards)
    summary = evaluation.summarize(per, evaluation.split_masks(entropy, (0.5, 1.0, 1.5)))
    assert summary["all"] == {"count": 5, "standard": 60.0, "reasoning": 40.0, "pass@2": 60.0}
    assert summary["easy"] == {"count": 3, "standard": pytest.approx(200 / 3),
                               "reasoning": 50.0, "pass@2": pytest.approx(200 / 3)}
    assert summary["hard"] == {"count": 1, "standard": 100.0, "reasoning": 50.0, "pass@2": 100.0}
    empty = evaluation.summarize(per, {"none": np.zeros(5, bool)})
    assert empty["none"] == {"count": 0, "standard": None, "reasoning": None, "pass@2": None}
    assert evaluation.flat_metrics(summary)["eval/reasoning/medium"] == 75.0

    result = dict(label="ckpt-a", step=100, split="validation", proxy="proxy-x",
                  thresholds=(0.5, 1.0, 1.5), entropy_top_k=16, num_examples=5, num_samples=2,
                  summary=summary)
    md = evaluation.render_markdown([result])
    assert "| ckpt-a | 100 | standard | 60.00 | 66.67 | 100.00 | 100.00 |" in md
    assert "| ckpt-a | 100 | reasoning (mean of 2) | 40.00 | 50.00 | 75.00 | 50.00 |" in md
    assert "| positions | | | 5 | 3 | 2 | 1 |" in md and "proxy-x" in md
    path = evaluation.write_json([result], str(tmp_path / "r.json"),
                                 {"note": "x", "arr": np.array([1.5, np.nan]), "n": np.int64(3)})
    loaded = json.load(open(path))
    assert loaded["results"][0]["summary"]["easy"]["reasoning"] == 50.0
    assert loaded["results"][0]["summary"]["all"]["pass@2"] == 60.0 and loaded["note"] == "x"
    assert loaded["arr"] == [1.5, None] and loaded["n"] == 3


# ----------------------------------------------------------------------------- tiny model

def _config():
    c = base_config("tiny")
    c.model.update(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16,
                   mlp_dim=64, dtype="float32")
    c.mesh.update(data=4, fsdp=1, tensor=2)
    c.data.update(batch_size=8, max_prompt_len=256, target_window=16, target_tokens=4,
                  min_context=4, positions_per_doc=2)
    c.sampling.update(max_new_tokens=6, prompt_buckets=(256,), cache_dtype="float32",
                      temperature=1.0)
    c.reward.max_pred_bytes = 16
    c.eval.update(num_examples=12, num_samples=G)  # 12 = one full batch of 8 + 4 padded rows
    return c


def _fit(params, cfg, tok, texts, steps=20):
    """A few Adam steps of next-token training, so the model gets some positions right and its
    entropies spread over the difficulty thresholds (a random init is near-uniform)."""
    ids = [tok.encode(t, allow_special=False) for t in texts]
    tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
    seg = np.zeros_like(tokens)
    for i, x in enumerate(ids):
        tokens[i, :len(x)], seg[i, :len(x)] = x, 1
    tx = optax.adam(3e-2)

    def loss(p):
        logp = jax.nn.log_softmax(model.forward(p, tokens, cfg, segment_ids=seg)[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return (nll * seg[:, 1:]).sum() / seg[:, 1:].sum()

    @jax.jit
    def step(p, o):
        g = jax.grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    opt = tx.init(params)
    for _ in range(steps):
        params, opt = step(params, opt)
    return params


@pytest.fixture(scope="module")
def setup():
    config = _config()
    tok = builtin_tokenizer(config.model.vocab_size)
    texts = list(corpora.synthetic_texts(30, seed=3))
    cfg = model.ModelConfig.from_config(config.model)
    mesh = sharding.make_mesh(config)
    shardings = sharding.param_shardings(mesh, model.logical_axes(cfg), model.param_shapes(cfg))
    params = _fit(model.init(cfg, jax.random.key(0)), cfg, tok, texts)
    return config, tok, texts, cfg, mesh, jax.device_put(params, shardings)


@pytest.fixture(scope="module")
def eval_set(setup, tmp_path_factory):
    config, tok, texts, cfg, mesh, params = setup
    cache = str(tmp_path_factory.mktemp("evalcache"))
    es = evaluation.build_eval_set(config, tok, mesh, proxy_params=params, proxy_cfg=cfg,
                                   proxy_name="tiny-init", cache_dir=cache,
                                   documents=[{"text": t} for t in texts], progress=False)
    return es, cache


def _independent_next_token(params, cfg, tok, texts, doc_index, position, max_len, k=16):
    """numpy argmax and top-k entropy of model.forward's logits at each row's last context token,
    with the contexts tokenised here and RIGHT padded (causal attention ignores what follows)."""
    ids = [tok.encode(t, allow_special=False) for t in texts]
    ctx = [ids[d][max(0, t - max_len):t] for d, t in zip(doc_index, position)]
    tokens = np.zeros((len(ctx), max(map(len, ctx))), np.int32)
    for i, c in enumerate(ctx):
        tokens[i, :len(c)] = c
    logits = np.asarray(jax.jit(model.forward, static_argnums=2)(
        jax.device_get(params), tokens, cfg), np.float64)
    last = logits[np.arange(len(ctx)), [len(c) - 1 for c in ctx]]
    top = np.sort(last, axis=-1)[:, -k:]
    p = np.exp(top - top.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    truth = np.array([ids[d][t] for d, t in zip(doc_index, position)])
    return last.argmax(-1), -(p * np.log(p)).sum(-1), truth


def test_eval_set_is_cached_and_keyed_by_proxy(setup, eval_set):
    config, tok, texts, cfg, mesh, params = setup
    es, cache = eval_set
    assert es.num_examples == 12 and len(es.batches) == 2
    assert [b["valid"].sum() for b in es.batches] == [8, 4]
    assert "tiny-init" in es.proxy and "itself" in es.proxy
    other = jax.tree.map(lambda x: x * 0.5, params)  # a different model: the cache must win
    again = evaluation.build_eval_set(config, tok, mesh, proxy_params=other, proxy_cfg=cfg,
                                      proxy_name="tiny-init", cache_dir=cache,
                                      documents=[{"text": t} for t in texts], progress=False)
    for a, b in zip(es.batches, again.batches):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    fresh = evaluation.build_eval_set(config, tok, mesh, proxy_params=other, proxy_cfg=cfg,
                                      proxy_name="half", cache_dir=cache,
                                      documents=[{"text": t} for t in texts], progress=False)
    assert fresh.key != es.key
    np.testing.assert_array_equal(fresh.batches[0]["position"], es.batches[0]["position"])
    assert not np.allclose(fresh.batches[0]["entropy"], es.batches[0]["entropy"])


def test_evaluate_standard_metric_equals_numpy(setup, eval_set):
    config, tok, texts, cfg, mesh, params = setup
    es, _ = eval_set
    res = evaluation.evaluate(params, cfg, config, tok, mesh, jax.random.key(1), eval_set=es,
                              label="init", step=0, progress=False)
    pp = res["per_position"]
    assert res["num_examples"] == 12 and pp["rewards"].shape == (12, G)
    preds, ents, truth = _independent_next_token(params, cfg, tok, texts, pp["doc_index"],
                                                 pp["position"], config.data.max_prompt_len)
    np.testing.assert_array_equal(pp["predicted"], preds)
    np.testing.assert_array_equal(pp["true_token"], truth)
    np.testing.assert_allclose(pp["entropy"], ents, atol=1e-4)
    correct = preds == truth
    assert 0 < correct.sum() < len(correct), "the test model should get some positions right"
    assert (ents > 1.5).any() and (ents < 0.5).any(), "entropies should span the thresholds"
    for name, t in (("all", -np.inf), ("easy", 0.5), ("medium", 1.0), ("hard", 1.5)):
        mask = ents > t
        assert res["summary"][name]["count"] == mask.sum()
        if mask.any():
            assert res["summary"][name]["standard"] == pytest.approx(100 * correct[mask].mean())
    # The reasoning numbers are the reward matrix's mean and any(), whatever its values.
    r = pp["rewards"]
    assert res["summary"]["all"]["reasoning"] == pytest.approx(100 * (r == 1).mean())
    assert res["summary"]["all"][f"pass@{G}"] == pytest.approx(
        100 * np.mean([float(any(x == 1 for x in row)) for row in r]))
    assert res["metrics"]["eval/standard/all"] == res["summary"]["all"]["standard"]
    assert 0 < res["diagnostics"]["mean_response_tokens"] <= config.sampling.max_new_tokens


def test_evaluate_reasoning_metric_equals_reference_reward(setup, eval_set):
    """A scripted sampler writes right and wrong boxed answers; the reasoning metric must equal
    the plain-Python reference reward's mean, and pass@G its any()."""
    config, tok, texts, cfg, mesh, params = setup
    es, _ = eval_set
    answers = {}
    for b in es.batches:
        for row in range(len(b["valid"])):
            answers[b["prompt_tokens"][row].tobytes()] = b["target_tokens"][row]
    head = tok.encode("so </think> \\boxed{")
    close = tok.encode("}")
    bytes_of = lambda ids: b"".join(tok.token_bytes(i) for i in ids)  # noqa: E731

    def response(target, b, j):
        kind = (3 * b + j) % 4
        if kind == 0:  # the true token: reward 1
            inner = [target[0]]
        elif kind == 1:  # two true tokens (ends on a boundary): reward 1
            inner = list(target[:2])
        elif kind == 2:  # a wrong token: reward 0
            inner = [(target[0] + 1) % 300 + 5]
        else:  # no box after </think>: reward 0
            return tok.encode("</think> " + bytes_of(target[:1]).decode("utf-8", "replace"))
        return head + inner + close

    refs = {}

    def scripted(p, prompts, rng):
        prompts = np.asarray(prompts.tokens)
        rows = []
        for b, pr in enumerate(prompts):
            target = answers[pr.tobytes()]
            for j in range(G):
                rows.append(response([int(x) for x in target if x >= 0], b, j))
                refs[(pr.tobytes(), j)] = rows[-1]
        width = max(map(len, rows)) + 2
        tokens = np.full((len(rows), width), tok.pad_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        lengths = np.array([len(r) for r in rows], np.int32)
        mat, vec = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
        return sampling.SampleOutput(jax.device_put(tokens, mat),
                                     jax.device_put(np.zeros(tokens.shape, np.float32), mat),
                                     jax.device_put(lengths, vec),
                                     jax.device_put(np.ones(len(rows), bool), vec))

    res = evaluation.evaluate(params, cfg, config, tok, mesh, jax.random.key(2), eval_set=es,
                              sampler=scripted, progress=False)
    # Independent: the reference reward over the scripted responses of every valid position.
    expected = []
    for b in es.batches:
        for row in np.nonzero(b["valid"])[0]:
            pr = b["prompt_tokens"][row].tobytes()
            resp = [refs[(pr, j)] for j in range(G)]
            r, _ = reward.reference_score(
                [[tok.token_bytes(i) for i in x] for x in resp],
                [[i in tok.special_ids for i in x] for x in resp],
                [b["target_bytes"][row][:b["target_len"][row]].tobytes()] * G,
                [b["boundaries"][row]] * G, max_pred_bytes=config.reward.max_pred_bytes)
            expected.append(r)
    expected = np.array(expected)
    assert 0 < expected.mean() < 1
    np.testing.assert_array_equal(res["per_position"]["rewards"], expected)
    assert res["summary"]["all"]["reasoning"] == pytest.approx(100 * expected.mean())
    assert res["summary"]["all"][f"pass@{G}"] == pytest.approx(
        100 * np.mean([float(any(v == 1 for v in row)) for row in expected]))
    masks = evaluation.split_masks(res["per_position"]["entropy"], config.eval.thresholds)
    for name, mask in masks.items():
        if mask.any():
            assert res["summary"][name]["reasoning"] == pytest.approx(
                100 * expected[mask].mean())
    md = evaluation.render_markdown([res])
    assert f"{res['summary']['all']['reasoning']:.2f}" in md


def test_proxy_checkpoint_gives_the_same_entropies_as_the_same_model(setup, eval_set, tmp_path):
    from rpt_jax import hf
    config, tok, texts, cfg, mesh, params = setup
    es, _ = eval_set
    folder = str(tmp_path / "proxy")
    tok.save(tmp_path / "tok")
    hf.save_params(params, cfg, folder, tokenizer_dir=tmp_path / "tok")
    pconfig = config.copy_and_resolve_references()
    pconfig.eval.proxy_checkpoint = folder
    build = lambda: evaluation.build_eval_set(  # noqa: E731
        pconfig, tok, mesh, documents=[{"text": t} for t in texts], progress=False,
        cache_dir=str(tmp_path / "cache"))
    px = build()
    assert folder in px.proxy and "proxy_checkpoint" in px.proxy
    for a, b in zip(es.batches, px.batches):
        np.testing.assert_array_equal(a["position"], b["position"])
        np.testing.assert_allclose(a["entropy"], b["entropy"], atol=1e-5)
    # the folder re-exported with other weights: its cached set is not reused
    hf.save_params(jax.tree.map(lambda x: x * 0.5, params), cfg, folder,
                   tokenizer_dir=tmp_path / "tok")
    again = build()
    assert again.key != px.key
    assert not np.allclose(again.batches[0]["entropy"], px.batches[0]["entropy"])


def test_a_fresh_start_forgets_only_the_first_evaluations_sets(eval_set, tmp_path):
    es, _ = eval_set
    keep = evaluation._cache_paths(str(tmp_path), "validation", "/models/proxy", "k1")
    drop = evaluation._cache_paths(str(tmp_path), "validation", evaluation.FIRST_EVALUATION, "k2")
    for paths in (keep, drop):
        evaluation.save_eval_set(es, *paths)
    evaluation.forget_first_evaluation(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in keep)


def test_workdir_params_restore_only_params_and_verify(setup, tmp_path):
    from rpt_jax import checkpoint, train_step
    config, tok, texts, cfg, mesh, params = setup
    opt = {"mu": jax.tree.map(jnp.zeros_like, params)}
    ck = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    ck.save(0, train_step.TrainState(params, opt, jnp.zeros((), jnp.int32)), {"data": {}})
    later = jax.tree.map(lambda x: x * 2 + 1, params)
    ck.save(3, train_step.TrainState(later, opt, jnp.ones((), jnp.int32)), {"data": {}})
    ck.close()
    run = str(tmp_path / "run")
    assert evaluation.checkpoint_steps(run) == [0, 3]
    shardings = jax.tree.map(lambda x: x.sharding, params)
    got = evaluation.load_workdir_params(run, 3, cfg, shardings)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(later)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    with pytest.raises(FileNotFoundError, match="step 5"):
        evaluation.load_workdir_params(run, 5, cfg, shardings)
    wider = dataclasses.replace(cfg, mlp_dim=128)
    with pytest.raises(ValueError, match="does not hold this config's model"):
        evaluation.load_workdir_params(run, 3, wider, sharding.param_shardings(
            mesh, model.logical_axes(wider), model.param_shapes(wider)))
    import orbax.checkpoint as ocp

    def outage(*args, **kwargs):
        raise TimeoutError("storage timed out")
    with pytest.MonkeyPatch.context() as mp:  # a passing error is no damaged checkpoint
        mp.setattr(ocp.CheckpointManager, "item_metadata", outage)
        with pytest.raises(TimeoutError, match="storage timed out"):
            evaluation.load_workdir_params(run, 3, cfg, shardings)
    import shutil
    for part in ("state", "meta"):  # partly written, as by a copy cut short
        shutil.rmtree(tmp_path / "run" / "checkpoints" / "3" / part)
        with pytest.raises(ValueError, match=r"checkpoint .*/3 cannot be read, empty or partly "
                                             r"written\? .*saved steps: \[0, 3\]"):
            evaluation.load_workdir_params(run, 3, cfg, shardings)


# ----------------------------------------------------------------------------- scripts

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name, *args, code=None):
    """scripts/<name> on configs/tiny.py (or `code` run with those arguments), in a subprocess."""
    argv = ["-c", code] if code else [str(ROOT / "scripts" / name)]
    return subprocess.run([sys.executable, *argv, f"--config={ROOT / 'configs' / 'tiny.py'}",
                           *map(str, args)], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_evaluate_script_names_a_missing_path_and_a_step_that_does_not_apply(tmp_path):
    missing = tmp_path / "no_run"
    done = _script("evaluate.py", f"--checkpoint={missing}")
    assert done.returncode != 0 and f"--checkpoint {missing} does not exist" in done.stderr
    assert not missing.exists()  # nothing made there
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "qwen2"}')
    done = _script("evaluate.py", f"--checkpoint={tmp_path / 'hf'}", "--step=2")
    assert done.returncode != 0 and "--step does not apply to --checkpoint" in done.stderr
    done = _script("evaluate.py", f"--workdir={tmp_path}", "--step=2")
    assert done.returncode != 0 and "--step does not apply to --workdir" in done.stderr
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    done = _script("evaluate.py", f"--checkpoint={tmp_path / 'weights'}")
    assert done.returncode != 0 and "holds safetensors weights but no readable config.json" \
        in done.stderr
    # a tokenizer with more ids than the model: named before weights or data are read
    from rpt_jax import hf
    cfg = model.ModelConfig(vocab_size=256, num_layers=1, hidden_size=32, num_heads=2,
                            num_kv_heads=1, head_dim=16, mlp_dim=64)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps(hf.hf_config(cfg, "float32")))
    builtin_tokenizer(512).save(tmp_path / "big")
    done = _script("evaluate.py", f"--checkpoint={tmp_path / 'big'}",
                   f"--output={tmp_path / 'out'}")
    assert done.returncode != 0 and "has 512 ids but the model's vocab_size is 256" \
        in done.stderr, done.stderr[-2000:]


def test_evaluate_script_writes_results_before_the_scaling_report(tmp_path):
    """--workdir: results.md / results.json are on disk when the plots or fits fail (checkpoint
    reads and evaluation stubbed)."""
    code = f"""if True:
        import sys
        sys.path.insert(0, {str(ROOT / 'scripts')!r})
        import evaluate
        from absl import app
        from rpt_jax import evaluation, scaling, tokenizer, trainer
        evaluation.checkpoint_steps = lambda path: [2, 4]
        evaluation.load_workdir_params = evaluation.build_eval_set = lambda *a, **k: None
        trainer.load_run_tokenizer = lambda config, path: tokenizer.builtin_tokenizer(512)
        evaluation.evaluate = lambda *a, label, step, **k: dict(
            label=label, step=step, split="validation", proxy="p", thresholds=(),
            entropy_top_k=16, num_examples=1, num_samples=2,
            summary={{"all": {{"count": 1, "standard": 50.0, "reasoning": 25.0}}}})
        def fail(*args):
            raise RuntimeError("plot failed")
        scaling.plot_vs_step = fail
        app.run(evaluate.main)
    """
    (tmp_path / "run").mkdir()  # a run's workdir holds the run's config.json: not an HF folder
    spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    (tmp_path / "run" / "config.json").write_text(tiny.get_config().to_json_best_effort())
    done = _script(None, f"--workdir={tmp_path / 'run'}", code=code)
    assert done.returncode != 0 and "plot failed" in done.stderr
    out = tmp_path / "run" / "evaluation"
    assert [r["step"] for r in json.loads((out / "results.json").read_text())["results"]] == [2, 4]
    assert "| step 4 | 4 | standard | 50.00 |" in (out / "results.md").read_text()


def test_prepare_data_script_skips_only_empty_splits_and_no_eval_proxy(tmp_path):
    """A split the corpus has no document in is a warning; a wrong option raises; the eval proxy
    is not opened (evaluation computes its entropies itself)."""
    (tmp_path / "one.txt").write_text("a single document of a few words\n")
    local = ["--config.data.corpus=local", f"--config.data.corpus_path={tmp_path / 'one.txt'}"]
    # "one.txt" lands in split train, here eval.split: an eval-proxy pass would open no_proxy
    done = _script("prepare_data.py", f"--workdir={tmp_path}", *local, "--config.eval.split=train",
                   f"--config.eval.proxy_checkpoint={tmp_path / 'no_proxy'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "/train: 1 documents" in done.stdout and "entropy of" not in done.stdout
    assert done.stderr.count("has no documents in split") == 2
    (tmp_path / "data.csv").write_text("text\n")
    for args, error in [
            (["--config.data.corpus=nope"], "data.corpus='nope' is not one of"),
            (["--config.data.corpus=local"], "corpus 'local' needs data.corpus_path"),
            ([local[0], f"--config.data.corpus_path={tmp_path / 'data.csv'}"],
             "a local corpus file must be .txt or .jsonl"),
            ([*local, "--splits=train,valid"], "--splits: 'valid' not one of")]:
        done = _script("prepare_data.py", f"--workdir={tmp_path}", *args)
        assert done.returncode != 0 and error in done.stderr, (args, done.stderr[-2000:])
