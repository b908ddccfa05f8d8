"""Next-token prediction accuracy, standard and with reasoning, by difficulty (paper Table 1).

On held-out positions of a corpus split:
- standard: the argmax of the model's next-token distribution, given the raw context x_<t (no
  template), equals the true next token x_t;
- reasoning: G samples with the RPT prompt, each scored with the prefix-match reward (Eq. 3);
  per position the mean of 1[reward = 1] over the G samples (the expected accuracy of one sample,
  the paper's "Random@1") and pass@G (at least one of the G is correct);
- by difficulty: a position is easy / medium / hard when an evaluation proxy model's top-k
  next-token entropy (nats) exceeds eval.thresholds (0.5 / 1.0 / 1.5 in the paper), nested: a
  hard position is also medium and easy. "all" is every position.

The eval set (the examples and their proxy entropies) is built once and cached in an .npz with a
.json description, keyed by the split's tokens, the data settings and the proxy, so every
checkpoint is compared on exactly the same positions and difficulty splits. The positions are
every candidate of the split (no entropy filtering; data.positions_per_doc per document, seeded),
shuffled with config.seed, the first eval.num_examples of them.

The proxy is eval.proxy_checkpoint (an HF folder sharing the evaluated model's tokenizer) or, when
that is "", the evaluated model itself: then the entropies come from the first model evaluated
with a given cache (the trainer's first eval, the first checkpoint of a sweep) and are reused.

Shapes: N positions, B rows per batch, G samples per position, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rpt_jax import contexts
from rpt_jax import model as model_lib
from rpt_jax import reward as reward_lib
from rpt_jax import sampling, sharding

log = logging.getLogger(__name__)

DIFFICULTY_NAMES = ("easy", "medium", "hard")
FIELDS = ("prompt_tokens", "prompt_mask", "context_tokens", "context_mask", "target_bytes",
          "target_len", "boundaries", "target_tokens", "doc_index", "position")


# ----------------------------------------------------------------------------- metric math

def split_names(thresholds: Sequence[float]) -> tuple[str, ...]:
    """easy/medium/hard for three thresholds (the paper's), else 'entropy>t' per threshold."""
    if len(thresholds) == len(DIFFICULTY_NAMES):
        return DIFFICULTY_NAMES
    return tuple(f"entropy>{t:g}" for t in thresholds)


def split_masks(entropy, thresholds: Sequence[float]) -> dict[str, np.ndarray]:
    """Membership of each position in 'all' and each difficulty split. entropy [N] (NaN: none).

    Split i holds the positions with entropy > thresholds[i]; thresholds must increase, so the
    splits are nested (hard within medium within easy).
    """
    thresholds = [float(t) for t in thresholds]
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"eval.thresholds={tuple(thresholds)} must be strictly increasing")
    entropy = np.asarray(entropy, np.float64)
    out = {"all": np.ones(entropy.shape, bool)}
    with np.errstate(invalid="ignore"):
        for name, t in zip(split_names(thresholds), thresholds):
            out[name] = entropy > t
    return out


def standard_correct(predicted, target_tokens) -> np.ndarray:
    """1[argmax == true next token]. predicted [N] ids; target_tokens [N, K] (column 0 = x_t)."""
    return np.asarray(predicted) == np.asarray(target_tokens)[:, 0]


def pass_at_k(correct, k: int) -> np.ndarray:
    """Unbiased pass@k of each row from n >= k samples with c correct: 1 - C(n-c, k) / C(n, k).

    correct [N, n] bool -> [N] float64 (Chen et al. 2021); k = n gives 1[any correct].
    """
    correct = np.asarray(correct, bool)
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must be in [1, {n}] (samples per position)")
    c = correct.sum(axis=1)
    return np.array([1.0 - math.comb(n - ci, k) / math.comb(n, k) for ci in c], np.float64)


def position_metrics(standard, rewards) -> dict[str, np.ndarray]:
    """Per-position scores in [0, 1]: standard [N] bool, rewards [N, G] (prefix-match, 0/1).

    Returns {"standard", "reasoning" (mean over the G samples of 1[reward = 1]), "pass@G"}.
    """
    rewards = np.asarray(rewards, np.float64)
    correct = rewards == 1.0
    return {"standard": np.asarray(standard, np.float64),
            "reasoning": correct.mean(axis=1),
            f"pass@{rewards.shape[1]}": pass_at_k(correct, rewards.shape[1])}


def summarize(per_position: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> dict:
    """Mean of each metric over each split, in percent: {split: {"count", metric: % or None}}."""
    out = {}
    for split, mask in masks.items():
        mask = np.asarray(mask, bool)
        row = {"count": int(mask.sum())}
        for name, values in per_position.items():
            row[name] = float(100.0 * np.mean(np.asarray(values)[mask])) if mask.any() else None
        out[split] = row
    return out


def flat_metrics(summary: Mapping[str, Mapping], prefix: str = "eval") -> dict[str, float]:
    """{"eval/<metric>/<split>": value} for logging; empty splits are left out."""
    return {f"{prefix}/{m}/{split}": v for split, row in summary.items() for m, v in row.items()
            if v is not None}


# ----------------------------------------------------------------------------- reports

def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_markdown(results: Sequence[Mapping]) -> str:
    """A Markdown table of one or more `evaluate` results (rows: checkpoint x metric, columns:
    splits), the position counts per split, and the proxy and thresholds."""
    if not results:
        raise ValueError("render_markdown: no results")
    splits = list(results[0]["summary"])
    metrics = [m for m in results[0]["summary"]["all"] if m != "count"]
    modes = {"standard": "standard", "reasoning": f"reasoning (mean of {results[0]['num_samples']})"}
    head = ["checkpoint", "step", "metric (%)"] + splits
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for m in metrics:
            cells = [str(r.get("label", "")), "" if r.get("step") is None else str(r["step"]),
                     modes.get(m, m)] + [_fmt(r["summary"][s][m]) for s in splits]
            lines.append("| " + " | ".join(cells) + " |")
    counts = results[0]["summary"]
    lines.append("| positions | | | " + " | ".join(str(counts[s]["count"]) for s in splits) + " |")
    thresholds = ", ".join(f"{n} > {t:g}" for n, t in zip(splits[1:], results[0]["thresholds"]))
    lines += ["", f"Difficulty by next-token top-{results[0]['entropy_top_k']} entropy (nats) of "
              f"the proxy: {results[0]['proxy']}; {thresholds} (nested). Split: "
              f"{results[0]['split']}, {results[0]['num_examples']} positions."]
    return "\n".join(lines) + "\n"


def _jsonable(x):
    """Arrays to lists, numpy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)


def write_json(results, path: str, extra: Mapping | None = None) -> str:
    """Write results (one dict or a list) and optional extra fields as JSON; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"results": list(results) if isinstance(results, (list, tuple)) else [results]}
    payload.update(extra or {})
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=1, allow_nan=False)
    return path


# ----------------------------------------------------------------------------- jitted parts

@functools.lru_cache(maxsize=8)
def _next_token_fn(cfg: model_lib.ModelConfig, top_k: int, mesh):
    """Jitted (params, tokens, mask) [B, C] left padded -> (argmax [B], top-k entropy [B])."""
    def fn(params, tokens, mask):
        mask = mask.astype(jnp.int32)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        h, _ = model_lib.hidden_states(params, tokens, cfg, positions, mask)
        logits = model_lib.logits_from_hidden(params, h[:, -1:], cfg)[:, 0]  # only the last column
        return (jnp.argmax(logits, axis=-1).astype(jnp.int32),
                contexts.topk_entropy(logits, min(top_k, cfg.vocab_size)))
    rows = sharding.batch_sharding(mesh, 1)
    jitted = jax.jit(fn, out_shardings=(rows, rows))

    def run(params, tokens, mask):
        with jax.set_mesh(mesh):
            return jitted(params, tokens, mask)
    return run


@functools.lru_cache(maxsize=8)
def _reward_fn(num_samples: int, think_end: bytes, max_pred_bytes: int, mesh):
    """Jitted prefix-match rewards [B, G] (and has_box [B, G]) of B*G samples, row b*G+g."""
    def fn(tokens, lengths, table, target_bytes, target_len, boundaries):
        rep = lambda x: jnp.repeat(x, num_samples, axis=0)  # noqa: E731 (row b*G+g <- context b)
        r, diag = reward_lib.score(tokens, lengths, table, rep(target_bytes), rep(target_len),
                                   rep(boundaries), kind="prefix_match", think_end=think_end,
                                   max_pred_bytes=max_pred_bytes)
        return r.reshape(-1, num_samples), diag["has_box"].reshape(-1, num_samples)
    mat = sharding.batch_sharding(mesh, 2)
    jitted = jax.jit(fn, out_shardings=(mat, mat))

    def run(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)
    return run


@functools.lru_cache(maxsize=4)
def _sampler(mesh, cfg: model_lib.ModelConfig, sampling_cfg: sampling.SamplingConfig, pad_id: int):
    shardings = sharding.param_shardings(mesh, model_lib.logical_axes(cfg))
    return sampling.make_sampler(mesh, cfg, sampling_cfg, shardings, pad_id=pad_id)


def stop_ids(config, tokenizer) -> tuple[int, ...]:
    """The tokenizer's end ids (EOS, generation_config.json's) plus the sampling.stop_strings,
    each of which must be one token of the vocabulary (the sampler stops on ids)."""
    ids = set(tokenizer.end_ids)
    for text in config.sampling.stop_strings:
        i = tokenizer.token_to_id(text)
        if i is None:
            raise ValueError(f"sampling.stop_strings: {text!r} is not one token of "
                             f"{tokenizer.source} (it encodes as {tokenizer.encode(text)})")
        ids.add(i)
    return tuple(sorted(ids))


def eval_sampling_config(config, tokenizer) -> sampling.SamplingConfig:
    """config.sampling with G = eval.num_samples."""
    cfg = sampling.SamplingConfig.from_config(config.sampling, stop_ids(config, tokenizer))
    return dataclasses.replace(cfg, num_samples=int(config.eval.num_samples))


def padded_byte_table(tokenizer, vocab_size: int) -> reward_lib.ByteTable:
    """The tokenizer's ByteTable grown to the model's vocabulary: ids the tokenizer lacks (padding
    rows of the embedding) are empty special tokens, so sampling one never yields a reward."""
    t = tokenizer.byte_table()
    extra = vocab_size - len(t.lengths)
    if extra < 0:
        raise ValueError(f"tokenizer {tokenizer.source} has {len(t.lengths)} ids > model "
                         f"vocab_size {vocab_size}")
    return reward_lib.ByteTable(np.pad(t.bytes, ((0, extra), (0, 0))),
                                np.pad(t.lengths, (0, extra)),
                                np.pad(t.special, (0, extra), constant_values=True))


# ----------------------------------------------------------------------------- the eval set

@dataclasses.dataclass
class EvalSet:
    """This host's eval examples in fixed-shape batches, with their proxy entropies.

    batches: host batches (numpy, contexts.make_batch fields, `entropy` filled, and `valid` [B]
    bool: False on the rows that only pad the last batch). proxy: a description of the proxy.
    """
    batches: list
    proxy: str
    split: str
    num_examples: int  # valid positions over all hosts
    key: str  # identifies the data, settings and proxy


# proxy_name of a run's self-proxy (eval.proxy_checkpoint == ""): the trainer's eval hook and
# scripts/evaluate.py --workdir both use it, so they share <workdir>/eval's cached set.
FIRST_EVALUATION = "the policy at its first evaluation"
_MEMO: dict = {}  # eval sets built in this process without a cache_dir, by key


def _eval_config(config):
    """The config the eval iterator reads: every position is a candidate (no entropy filter),
    ungrouped (the eval set does not depend on data.contexts_per_doc)."""
    cfg = config.copy_and_resolve_references()
    cfg.data.entropy_threshold = 0.0
    cfg.data.proxy_checkpoint = ""
    cfg.data.contexts_per_doc = 1
    return cfg


def _folder_stamp(path: str) -> list:
    """(name, bytes, mtime) of an HF folder's weights and configs: a re-exported proxy builds
    a new set. [] for a name that is not a folder (a self-proxy)."""
    if not os.path.isdir(path):
        return []
    names = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".json")))
    stats = [os.stat(os.path.join(path, n)) for n in names]
    return [(n, st.st_size, st.st_mtime_ns) for n, st in zip(names, stats)]


def _set_key(config, iterator, proxy_id: str) -> str:
    spec = dataclasses.asdict(iterator.spec)
    fields = [iterator.docs.fingerprint(), config.eval.split, proxy_id, _folder_stamp(proxy_id),
              spec,
              int(config.eval.num_examples), int(config.seed), int(config.data.min_context),
              int(config.data.positions_per_doc), int(config.data.entropy_top_k),
              int(config.data.batch_size), int(iterator.process_index), int(iterator.process_count)]
    n = iterator.global_batch // iterator.process_count
    if not np.array_equal(iterator.rows, np.arange(n) + iterator.process_index * n):
        fields.append(iterator.rows.tolist())  # a host's rows not its slice in process order
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _proxy_tag(proxy_id: str) -> str:
    """The proxy's part of a cached set's file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(proxy_id.rstrip("/")) or "proxy")[-40:]


def _cache_paths(cache_dir: str, split: str, proxy_id: str, key: str) -> tuple[str, str]:
    stem = os.path.join(os.path.expanduser(cache_dir),
                        f"evalset-{split}-{_proxy_tag(proxy_id)}-{key}")
    return stem + ".npz", stem + ".json"


def forget_first_evaluation(cache_dir: str) -> None:
    """Remove the sets cached under FIRST_EVALUATION's name: a run starting afresh in a workdir
    (another model, or a first run killed before its first checkpoint) scores its own."""
    pattern = f"evalset-*-{_proxy_tag(FIRST_EVALUATION)}-*"
    for name in glob.glob(os.path.join(os.path.expanduser(cache_dir), pattern)):
        os.remove(name)


def save_eval_set(es: EvalSet, npz_path: str, json_path: str) -> None:
    """Write the eval set's arrays (.npz, no pickle) and description (.json), atomically."""
    folder = os.path.dirname(os.path.abspath(npz_path))
    os.makedirs(folder, exist_ok=True)
    arrays = {f"b{i}_{k}": v for i, b in enumerate(es.batches) for k, v in b.items()}
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, npz_path)
    meta = dict(proxy=es.proxy, split=es.split, num_examples=es.num_examples, key=es.key,
                num_batches=len(es.batches), fields=sorted(es.batches[0]) if es.batches else [])
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, json_path)


def load_eval_set(npz_path: str, json_path: str) -> EvalSet:
    """Read an eval set written by `save_eval_set`."""
    with open(json_path) as f:
        meta = json.load(f)
    with np.load(npz_path, allow_pickle=False) as z:
        batches = [{k: z[f"b{i}_{k}"] for k in meta["fields"]} for i in range(meta["num_batches"])]
    return EvalSet(batches, meta["proxy"], meta["split"], meta["num_examples"], meta["key"])


def _load_proxy(config, tokenizer, mesh):
    """Params and ModelConfig of eval.proxy_checkpoint, checking that it shares the tokenizer."""
    from rpt_jax import hf
    from rpt_jax.tokenizer import Tokenizer
    path = config.eval.proxy_checkpoint
    cfg = contexts.proxy_model_config(config, path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"eval.proxy_checkpoint={path}: its vocabulary ({cfg.vocab_size}) is "
                         f"smaller than the tokenizer's ({tokenizer.vocab_size})")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        theirs = Tokenizer.from_dir(path)
        n = tokenizer.vocab_size
        if theirs.vocab_size != n or any(theirs.token_bytes(i) != tokenizer.token_bytes(i)
                                         for i in range(n)):
            raise ValueError(f"eval.proxy_checkpoint={path} has another tokenizer than the "
                             f"evaluated model ({tokenizer.source}); positions are token ids, "
                             "so the proxy must share the vocabulary")
    shapes = model_lib.param_shapes(cfg)
    shardings = sharding.param_shardings(mesh, model_lib.logical_axes(cfg), shapes)
    return hf.load_params(path, cfg, shardings), cfg


def build_eval_set(config, tokenizer, mesh, *, proxy_params=None, proxy_cfg=None,
                   proxy_name: str = "self", cache_dir: str | None = None, documents=None,
                   data_dir: str | None = None, progress: bool = True,
                   resumed_at: int = 0) -> EvalSet:
    """The eval examples of config.eval.split with their proxy entropies (cached).

    The proxy is eval.proxy_checkpoint when set; else (proxy_params, proxy_cfg), normally the
    evaluated model, recorded as `proxy_name`. With `cache_dir`, a set saved there under the same
    key is loaded and a new one is saved; without, sets are kept in memory for this process.
    documents / data_dir: passed to contexts.ContextIterator (tests pass documents directly).
    resumed_at: the step of a resumed run, whose set should have been cached at its first
    evaluation: building one then (the cache deleted, the split or eval settings changed) says
    so, as its entropies come from the policy at this step.
    """
    from tqdm import tqdm
    ecfg = _eval_config(config)
    it = contexts.ContextIterator(ecfg, config.eval.split, tokenizer, data_dir=data_dir,
                                  documents=documents,
                                  rows=sharding.process_rows(mesh, ecfg.data.batch_size))
    path = config.eval.proxy_checkpoint
    proxy_id = os.path.abspath(path) if path else proxy_name
    key = _set_key(config, it, proxy_id)
    paths = _cache_paths(cache_dir, config.eval.split, proxy_id, key) if cache_dir else None
    cached = _MEMO.get(key) if not paths else None
    if paths and all(os.path.isfile(p) for p in paths):
        cached = load_eval_set(*paths)
        cached = cached if cached.key == key else None
    # Building scores on every process's devices: all hosts load, or all build (one host
    # without its cached file would otherwise wait forever for the others).
    if sharding.all_processes(cached is not None):
        if paths:
            log.info("eval set loaded from %s", paths[0])
        return cached

    if path:
        proxy_params, proxy_cfg = _load_proxy(config, tokenizer, mesh)
        description = f"{proxy_id} (eval.proxy_checkpoint)"
    elif proxy_params is None:
        raise ValueError("eval.proxy_checkpoint is empty and no proxy params were given")
    else:
        description = f"the evaluated model itself ({proxy_name}; eval.proxy_checkpoint is empty)"
        if resumed_at > 0:
            log.warning("no cached eval set in %s matches this run's eval settings: building one "
                        "whose entropies (difficulty splits) come from the policy at step %d, not "
                        "from its first evaluation, so evals before and after differ in their "
                        "splits", cache_dir, resumed_at)
    total = min(int(config.eval.num_examples), it.num_examples)
    if total < config.eval.num_examples:
        log.warning("%s has %d positions < eval.num_examples=%d; evaluating all of them",
                    config.eval.split, total, config.eval.num_examples)
    num_batches = -(-total // it.global_batch)
    score = _next_token_fn(proxy_cfg, int(config.data.entropy_top_k), mesh)
    batches = []
    for step in tqdm(range(num_batches), desc="eval set entropies", disable=not progress):
        batch = next(it)
        batch["valid"] = step * it.global_batch + it.rows < total
        g = contexts.to_global({k: batch[k] for k in ("context_tokens", "context_mask")}, mesh)
        _, entropy = score(proxy_params, g["context_tokens"], g["context_mask"])
        batch["entropy"] = sharding.to_host(entropy)[it.rows].astype(np.float32)
        batches.append(batch)
    es = EvalSet(batches, description, config.eval.split, total, key)
    if paths:
        save_eval_set(es, *paths)
        log.info("eval set saved to %s", paths[0])
    else:
        _MEMO[key] = es
    return es


# ----------------------------------------------------------------------------- evaluation

Sampler = Callable[..., sampling.SampleOutput]


def evaluate(params, model_cfg: model_lib.ModelConfig, config, tokenizer, mesh, rng, *,
             eval_set: EvalSet | None = None, cache_dir: str | None = None,
             proxy_name: str = "self", label: str = "", step: int | None = None,
             sampler: Sampler | None = None, documents=None, data_dir: str | None = None,
             progress: bool = True) -> dict:
    """Standard and reasoning next-token accuracy of `params` on the eval set, by difficulty.

    params: sharded like training (`sharding.param_shardings`). rng: the sampling key (batch i
    samples with fold_in(rng, i)). eval_set: a prebuilt set (else `build_eval_set` with these
    params as the proxy when eval.proxy_checkpoint is ""). sampler: (params, sampling.Prompts,
    rng) -> SampleOutput with rows b*G+g; default `sampling.make_sampler` with
    config.sampling and G = eval.num_samples. The reward is always prefix_match (accuracy),
    whatever reward.kind training uses.

    Returns a JSON-able dict: summary {split: {"count", "standard", "reasoning", "pass@G"}} in
    percent, metrics (flat, for logging), diagnostics, per_position arrays, and the settings.
    """
    from tqdm import tqdm
    if eval_set is None:
        eval_set = build_eval_set(config, tokenizer, mesh, proxy_params=params,
                                  proxy_cfg=model_cfg, proxy_name=proxy_name,
                                  cache_dir=cache_dir, documents=documents, data_dir=data_dir,
                                  progress=progress)
    g = int(config.eval.num_samples)
    if sampler is None:
        sampler = _sampler(mesh, model_cfg, eval_sampling_config(config, tokenizer),
                           tokenizer.pad_id)
    table = jax.device_put(padded_byte_table(tokenizer, model_cfg.vocab_size),
                           sharding.replicated(mesh))
    next_token = _next_token_fn(model_cfg, int(config.data.entropy_top_k), mesh)
    rewards_of = _reward_fn(g, str(config.reward.think_end).encode(),
                            int(config.reward.max_pred_bytes), mesh)

    keep = ("target_tokens", "entropy", "doc_index", "position", "valid")
    cols = {k: [] for k in keep + ("predicted", "rewards", "has_box", "lengths")}
    for i, batch in enumerate(tqdm(eval_set.batches, desc=f"eval {label}".strip(),
                                   disable=not progress)):
        gb = contexts.to_global(batch, mesh)
        predicted, _ = next_token(params, gb["context_tokens"], gb["context_mask"])
        out = sampler(params, sampling.Prompts(gb["prompt_tokens"], gb["prompt_mask"]),
                      jax.random.fold_in(rng, i))
        if out.tokens.shape[0] != g * gb["prompt_tokens"].shape[0]:
            raise ValueError(f"sampler returned {out.tokens.shape[0]} rows for "
                             f"{gb['prompt_tokens'].shape[0]} prompts x eval.num_samples={g}")
        rewards, has_box = rewards_of(out.tokens, out.lengths, table, gb["target_bytes"],
                                      gb["target_len"], gb["boundaries"])
        for k in keep:
            cols[k].append(sharding.to_host(gb[k]))
        cols["predicted"].append(sharding.to_host(predicted))
        cols["rewards"].append(sharding.to_host(rewards))
        cols["has_box"].append(sharding.to_host(has_box))
        cols["lengths"].append(sharding.to_host(out.lengths).reshape(-1, g))
    valid = np.concatenate(cols.pop("valid"))
    col = {k: np.concatenate(v)[valid] for k, v in cols.items()}

    per_position = position_metrics(standard_correct(col["predicted"], col["target_tokens"]),
                                    col["rewards"])
    thresholds = tuple(float(t) for t in config.eval.thresholds)
    summary = summarize(per_position, split_masks(col["entropy"], thresholds))
    return dict(
        label=label, step=step, split=eval_set.split, proxy=eval_set.proxy,
        thresholds=thresholds, entropy_top_k=int(config.data.entropy_top_k),
        num_examples=int(valid.sum()), num_samples=g,
        temperature=float(config.sampling.temperature), summary=summary,
        metrics=flat_metrics(summary),
        diagnostics=dict(boxed_fraction=float(col["has_box"].mean()),
                         mean_response_tokens=float(col["lengths"].mean())),
        per_position=dict(doc_index=col["doc_index"], position=col["position"],
                          entropy=col["entropy"], true_token=col["target_tokens"][:, 0],
                          predicted=col["predicted"], rewards=col["rewards"], **per_position))


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_dir(path: str) -> str:
    """The rpt_jax.checkpoint folder of a training workdir (or the folder itself)."""
    path = os.path.abspath(os.path.expanduser(path))
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def checkpoint_steps(path: str) -> list[int]:
    """Saved steps of a workdir's rpt_jax checkpoints, ascending (finished saves only)."""
    import orbax.checkpoint as ocp
    folder = checkpoint_dir(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path} is neither an HF folder (config.json) nor a workdir with "
                                "checkpoints/")
    mgr = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(read_only=True))
    return sorted(mgr.all_steps())


def load_workdir_params(path: str, step: int, cfg: model_lib.ModelConfig, shardings) -> dict:
    """Only the params of train-state checkpoint `step` in a workdir, placed with `shardings`.

    Reads rpt_jax.checkpoint's layout (<dir>/<step>/state: the flat {"params/...": array, ...}
    train state; <dir>/<step>/meta: JSON with each leaf's fingerprint) with a partial restore, so
    the optimizer state is never loaded, and checks the params against the saved fingerprints.
    """
    import orbax.checkpoint as ocp
    from rpt_jax import checkpoint
    folder = checkpoint_dir(path)
    leaves = jax.tree.flatten_with_path(model_lib.param_shapes(cfg))[0]
    names = ["params/" + jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    target = {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
              for n, (_, s), sh in zip(names, leaves, jax.tree.leaves(shardings))}
    mgr = ocp.CheckpointManager(
        folder, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={checkpoint.STATE: ocp.PyTreeCheckpointHandler(),
                       checkpoint.META: ocp.JsonCheckpointHandler()})
    if step not in mgr.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step} in {folder}; saved steps: "
                                f"{sorted(mgr.all_steps())}")
    def unreadable(e):
        if checkpoint._is_transient(e):  # memory, a storage outage: not the checkpoint's fault
            raise e
        return ValueError(f"checkpoint {folder}/{step} cannot be read, empty or partly written? "
                          f"({type(e).__name__}: {str(e)[:300]}); saved steps: "
                          f"{sorted(mgr.all_steps())}, choose another with --step")

    try:
        saved = mgr.item_metadata(step)[checkpoint.STATE]
    except Exception as e:  # noqa: BLE001 (orbax raises KeyError, FileNotFoundError, ...)
        raise unreadable(e) from e
    saved = getattr(saved, "tree", saved)
    if not isinstance(saved, dict):
        raise unreadable(TypeError(f"no state tree (metadata {type(saved).__name__})"))
    wrong = [f"{n}: saved {tuple(saved[n].shape)}, config {tuple(target[n].shape)}"
             for n in names if n in saved and tuple(saved[n].shape) != tuple(target[n].shape)]
    missing = [n for n in names if n not in saved]
    if wrong or missing:
        raise ValueError(f"checkpoint {folder}/{step} does not hold this config's model: "
                         f"missing {missing[:5]}, shapes {wrong[:5]}")
    restore_args = {n: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                            dtype=t.dtype) for n, t in target.items()}
    try:
        out = mgr.restore(step, args=ocp.args.Composite(**{
            checkpoint.STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                     partial_restore=True),
            checkpoint.META: ocp.args.JsonRestore()}))
    except Exception as e:  # noqa: BLE001
        raise unreadable(e) from e
    flat, meta = out[checkpoint.STATE], out[checkpoint.META]
    got = checkpoint.fingerprint(flat)
    bad = [n for n in names if got[n] != meta["fingerprint"].get(n)]
    if bad:
        raise ValueError(f"checkpoint {folder}/{step}: params differ from what was saved "
                         f"(corrupt?): {bad[:5]}")
    return jax.tree.unflatten(jax.tree.structure(model_lib.param_shapes(cfg)),
                              [flat[n] for n in names])
