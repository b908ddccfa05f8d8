"""Build a config's corpus and, with data.proxy_checkpoint, run the training entropy pass once.

    python scripts/prepare_data.py --config configs/tiny.py --workdir /tmp/rpt_tiny

Writes the TFDS corpus under data.data_dir ("" = <workdir>/tfds) and prints, per split, the
documents, tokens and examples. With data.proxy_checkpoint set it scores every split with that
model (top-k entropy per position, for data.entropy_threshold); results are cached under
<data_dir>/entropy/, so a second run is quick. eval.proxy_checkpoint is not used here: evaluation
computes the eval set's entropies itself, on its own contexts (rpt_jax.evaluation). A split the
corpus has no document in (a small corpus) is skipped with a warning; any other error is raised.
The tiny config builds in ~2 s.
"""
from __future__ import annotations

import functools
import os

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

from rpt_jax import contexts, corpora, hf, model as model_lib, sharding
from rpt_jax.tokenizer import load_tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (the corpus goes to <workdir>/tfds "
                               "unless data.data_dir is set).")
_SPLITS = flags.DEFINE_list("splits", list(corpora.SPLITS),
                            f"Splits to build, of {', '.join(corpora.SPLITS)}.")
_WINDOW = flags.DEFINE_integer("entropy_window", 1024, "Tokens per scoring window.")
_ROWS = flags.DEFINE_integer("entropy_batch_rows", 32, "Windows per scoring batch (global).")


def score(config, proxy, data_dir, tokenizer, split_docs, mesh):
    """Run (or find cached) the entropy pass of one proxy over some splits; print what it keeps."""
    cfg = contexts.proxy_model_config(config, proxy)
    if tokenizer.vocab_size > cfg.vocab_size:  # before loading any weights
        raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but proxy "
                         f"{proxy} has vocab_size {cfg.vocab_size}")

    @functools.cache
    def params():  # read once, and only for a split whose cached entropies do not apply
        shardings = sharding.param_shardings(mesh, model_lib.logical_axes(cfg),
                                             model_lib.param_shapes(cfg))
        return hf.load_params(proxy, cfg, shardings)

    for key, toks in split_docs.items():
        folder = contexts.entropy_cache_dir(data_dir, key, proxy, cfg, config.data.entropy_top_k,
                                            toks, tokenizer.leading_ids)
        ent = contexts.score_corpus(params, cfg, tokenizer, toks, mesh=mesh,
                                    top_k=config.data.entropy_top_k, window=_WINDOW.value,
                                    batch_rows=_ROWS.value, cache_dir=folder)
        flat = np.concatenate([e[1:] for e in ent]) if ent else np.zeros(0)
        shares = {thr: float(np.mean(flat > thr)) if flat.size else 0.0
                  for thr in sorted({*config.eval.thresholds, config.data.entropy_threshold})}
        print(f"{key}: entropy of {flat.size} positions by {os.path.basename(proxy.rstrip('/'))}: "
              f"mean {np.nanmean(flat) if flat.size else float('nan'):.3f} nats; share above "
              + ", ".join(f"{t:g}: {s:.1%}" for t, s in shares.items()) + f" -> {folder}")


def main(argv):
    del argv
    config = _CONFIG.value
    if not config.data.data_dir and not _WORKDIR.value:
        raise app.UsageError("set --workdir or --config.data.data_dir")
    unknown = [s for s in _SPLITS.value if s not in corpora.SPLITS]
    if unknown:
        raise app.UsageError(f"--splits: {', '.join(map(repr, unknown))} not one of "
                             f"{', '.join(corpora.SPLITS)}")
    data_dir = config.data.data_dir or os.path.join(_WORKDIR.value, "tfds")
    tokenizer = load_tokenizer(config)
    spec = contexts.ExampleSpec.from_config(config, tokenizer)  # template errors first
    if config.data.proxy_checkpoint:  # and a bad proxy, before the corpus is built
        contexts.check_proxy(config, config.data.proxy_checkpoint)
    tokenized = {}
    for split in _SPLITS.value:
        try:
            docs = corpora.load_corpus(config, split, data_dir)
        except ValueError as e:  # only a split the corpus has no document in is skipped
            if "has no documents in split" not in str(e):
                raise
            logging.warning("%s", e)
            continue
        toks = contexts.tokenize_documents(tokenizer, [d["text"] for d in docs])
        doc_index, _, skipped = contexts.select_positions(
            toks.lengths, config.data.min_context, config.data.positions_per_doc, config.seed)
        tokenized[split] = (docs.key, toks)
        print(f"{docs.key}: {len(docs)} documents, {int(toks.offsets[-1])} tokens, "
              f"{len(doc_index)} examples before entropy filtering (skipped {skipped}); "
              f"template {config.data.template!r} takes {len(spec.prefix) + len(spec.suffix)} "
              f"of {spec.max_prompt_len} prompt tokens")
    if config.data.proxy_checkpoint and tokenized:
        score(config, config.data.proxy_checkpoint, data_dir, tokenizer,
              dict(tokenized.values()), sharding.make_mesh(config))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
