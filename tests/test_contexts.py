"""rpt_jax.contexts: examples against transformers' SmolLM2 tokenizer on real multi-byte text,
host sharding, exact iterator restore, and the entropy pass against a numpy reference."""
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from rpt_jax import contexts, corpora, hf, model as model_lib, sharding
from rpt_jax import tokenizer as tok_lib
from rpt_jax.config import base_config
from real_text import MULTIBYTE, champ_problem, wiki_leads

def real_docs(n=12):
    return [{"text": t} for t in wiki_leads(n) + [champ_problem(solution=True), MULTIBYTE * 3]]


@pytest.fixture(scope="module")
def builtin():
    return tok_lib.builtin_tokenizer(512)


def make_config(**data):
    c = base_config("tiny")
    c.data.batch_size = 8
    c.data.max_prompt_len = 512
    c.data.target_window = 48
    c.data.target_tokens = 12
    c.data.min_context = 4
    c.data.positions_per_doc = 6
    c.sampling.prompt_buckets = (128, 256, 512)
    for k, v in data.items():
        if k in c.data:
            c.data[k] = v
        else:
            c[k] = v
    return c


def drain(it, steps):
    return [next(it) for _ in range(steps)]


def assert_resumes(it, config, builtin, docs, steps):
    """Drain `steps` batches of host 1 of 2, save its state through JSON; a fresh iterator
    restored from it yields the same next 2 batches. Returns the state."""
    drain(it, steps)
    state = json.loads(json.dumps(it.get_state()))
    expected = drain(it, 2)
    fresh = contexts.ContextIterator(config, "train", builtin, 1, 2, documents=docs)
    fresh.set_state(state)
    for want, got in zip(expected, drain(fresh, 2)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    return state


def test_examples_match_transformers_bytes_on_real_text(smol):
    ref, tok = smol
    docs = real_docs()
    config = make_config()
    it = contexts.ContextIterator(config, "train", tok, 0, 1, documents=docs)
    spec = it.spec
    prefix_text = contexts.TEMPLATES["v0"].split("{prompt_content}")[0]
    assert ref.decode(list(spec.prefix)) == prefix_text and spec.suffix == ()
    w, k = config.data.target_window, config.data.target_tokens
    checked = multibyte = 0
    for batch in drain(it, -(-it.num_examples // 8)):
        plen = batch["prompt_mask"].sum(1)
        assert batch["prompt_tokens"].shape[1] == min(
            b for b in config.sampling.prompt_buckets if b >= plen.max())
        for i, (d, t) in enumerate(zip(batch["doc_index"], batch["position"])):
            text = docs[d]["text"]
            ids = ref.encode(text, add_special_tokens=False)
            assert config.data.min_context <= t < len(ids)
            prompt = batch["prompt_tokens"][i][batch["prompt_mask"][i] == 1]
            assert list(prompt) == list(spec.prefix) + ids[max(0, t - spec.budget):t]
            assert batch["prompt_tokens"][i][:len(batch["prompt_mask"][i]) - plen[i]].tolist() == [
                tok.pad_id] * (len(batch["prompt_mask"][i]) - plen[i])
            ctx = batch["context_tokens"][i][batch["context_mask"][i] == 1]
            assert list(ctx) == ids[max(0, t - config.data.max_prompt_len):t]
            cont = ids[t:t + k]
            assert list(batch["target_tokens"][i]) == cont + [-1] * (k - len(cont))
            # Reference byte offsets: transformers' decoding of each token prefix, where it does
            # not end inside a multi-byte character.
            before = ref.decode(ids[:t])
            if "\ufffd" in before:
                continue
            off = len(before.encode())
            target = text.encode()[off:off + w]
            got = batch["target_bytes"][i][:batch["target_len"][i]].tobytes()
            assert got == target and not batch["target_bytes"][i][len(got):].any()
            multibyte += not target.isascii()
            for j in range(k):
                if t + j >= len(ids):
                    assert batch["boundaries"][i][j] == 0
                    continue
                upto = ref.decode(ids[:t + j + 1])
                if "\ufffd" in upto:
                    continue
                b = len(upto.encode()) - off
                assert batch["boundaries"][i][j] == (b if b <= w else 0), (d, t, j)
                checked += 1
    assert checked > 300 and multibyte > 5, (checked, multibyte)


@pytest.mark.parametrize("chat", [False, True])
def test_template_stays_whole_under_left_truncation(smol, chat):
    ref, tok = smol
    docs = real_docs(4)
    before, after = contexts.TEMPLATES["v0"].split("{prompt_content}")
    prefix, suffix = contexts.template_ids(tok, "v0", chat)
    room = 10
    config = make_config(max_prompt_len=len(prefix) + len(suffix) + room, min_context=20,
                         chat_template=chat, target_window=16)
    it = contexts.ContextIterator(config, "train", tok, 0, 1, documents=docs)
    batch = next(it)
    for i, (d, t) in enumerate(zip(batch["doc_index"], batch["position"])):
        ids = ref.encode(docs[d]["text"], add_special_tokens=False)
        prompt = batch["prompt_tokens"][i][batch["prompt_mask"][i] == 1].tolist()
        assert len(prompt) == config.data.max_prompt_len
        assert prompt == prefix + ids[t - room:t] + suffix
        if chat:  # the same string transformers renders around the context's text
            assert ref.decode(prompt) == ref.apply_chat_template(
                [{"role": "user", "content": before + ref.decode(ids[t - room:t]) + after}],
                tokenize=False, add_generation_prompt=True)
        else:
            assert ref.decode(prompt[:len(prefix)]) == before
    with pytest.raises(ValueError, match="no room for context"):
        contexts.ContextIterator(make_config(max_prompt_len=len(prefix) + len(suffix),
                                             chat_template=chat),
                                 "train", tok, 0, 1, documents=docs)


def arith_docs(n=120):
    return [{"text": t} for t in corpora.synthetic_texts(n, seed=3)]


def arith_config(**data):
    """For the built-in 512-id tokenizer: the short template, 128-token prompts."""
    c = make_config(max_prompt_len=128, template="short", **data)
    c.sampling.prompt_buckets = (64, 128)
    return c


def rows(batch):
    return list(zip(batch["doc_index"].tolist(), batch["position"].tolist()))


def test_host_shards_disjoint_and_cover(builtin):
    docs = arith_docs()
    config = arith_config()
    single = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    hosts = [contexts.ContextIterator(config, "train", builtin, p, 4, documents=docs)
             for p in range(4)]
    n = single.num_examples
    steps = -(-n // 8) + 3  # past the end of the first epoch
    seen = []
    for _ in range(steps):
        whole = next(single)
        parts = [next(h) for h in hosts]
        assert all(len(rows(p)) == 2 for p in parts)
        assert sum((rows(p) for p in parts), []) == rows(whole)  # disjoint, and they cover it
        for key in whole:  # identical shapes on every host (global bucket)
            assert len({p[key].shape[1:] for p in parts}) == 1
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        seen += rows(whole)
    assert len(set(seen[:n])) == n == len(set(seen))  # one epoch holds every example once
    with pytest.raises(ValueError, match="not divisible"):
        contexts.ContextIterator(config, "train", builtin, 0, 3, documents=docs)


def test_restore_continues_with_the_next_example(builtin):
    docs = arith_docs()
    config = arith_config()
    it = contexts.ContextIterator(config, "train", builtin, 1, 2, documents=docs)
    per_epoch = -(-it.num_examples // 8)
    for steps in (0, 5, per_epoch):  # also across an epoch boundary
        it.set_state({"step": 0, "num_examples": it.num_examples, "seed": it.seed})
        state = assert_resumes(it, config, builtin, docs, steps)
        assert all(isinstance(v, int) for v in state.values())
    other = contexts.ContextIterator(config, "train", builtin, 1, 2, documents=docs[:50])
    with pytest.raises(ValueError, match="other data"):
        other.set_state(state)
    # resumed with another batch size: on after the contexts read, when they make whole batches
    it.set_state({**state, "step": 3})  # 24 contexts read
    halves = contexts.ContextIterator(arith_config(batch_size=4), "train", builtin, 1, 2,
                                      documents=docs)
    halves.set_state(it.get_state())
    np.testing.assert_array_equal(np.concatenate([halves.global_rows(halves.step),
                                                  halves.global_rows(halves.step + 1)]),
                                  it.global_rows(3))
    sixteen = contexts.ContextIterator(arith_config(batch_size=16), "train", builtin, 1, 2,
                                       documents=docs)
    with pytest.raises(ValueError, match="24 contexts read are not whole batches of "
                                         "data.batch_size=16"):
        sixteen.set_state({**state, "step": 3})
    # The seed decides the order.
    config.seed = 1
    reseeded = contexts.ContextIterator(config, "train", builtin, 1, 2, documents=docs)
    it.set_state({"step": 0, "num_examples": it.num_examples, "seed": it.seed})
    assert rows(next(reseeded)) != rows(next(it))


def test_positions_and_bad_documents(builtin, caplog):
    docs = arith_docs(30) + [{"text": ""}, {"text": "1 + 1"}]
    config = arith_config(min_context=8, positions_per_doc=3)
    with caplog.at_level(logging.WARNING):
        it = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    assert "'too_short': 2" in caplog.text
    lengths = it.docs.lengths
    assert it.num_examples == 30 * 3 and 30 not in it.doc_index and 31 not in it.doc_index
    assert np.all(it.position >= 8) and np.all(it.position < lengths[it.doc_index])
    again = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    np.testing.assert_array_equal(again.position, it.position)
    config.seed = 7
    reseeded = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    assert not np.array_equal(reseeded.position, it.position)
    with pytest.raises(ValueError, match="no examples"):
        contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs[30:])
    with pytest.raises(ValueError, match="needs data.proxy_checkpoint"):
        contexts.ContextIterator(arith_config(entropy_threshold=1.0), "train", builtin, 0, 1,
                                 documents=docs)


# ----------------------------------------------------------------------------- document groups

def check_document_rows(batch, m, spec, ids_of):
    """Every prompt rebuilt from its group's doc row and its tail; groups are one document's
    untruncated positions; doc rows are prefix + the document's ids, right-padded."""
    b = len(batch["doc_index"])
    assert batch["doc_tokens"].shape[0] == batch["doc_mask"].shape[0] == b // m
    assert batch["tail_tokens"].shape == (b, 1 + len(spec.suffix))
    width = batch["doc_tokens"].shape[1]
    d = batch["doc_index"].reshape(-1, m)
    t = batch["position"].reshape(-1, m)
    assert (d == d[:, :1]).all() and (t <= spec.budget).all()
    assert all(len(set(row)) == m for row in t.tolist())  # distinct positions in a group
    lengths = len(spec.prefix) + t.max(1) - 1
    assert width == spec.bucket(lengths.max())
    for j in range(b // m):
        ids = ids_of(d[j, 0])
        assert batch["doc_mask"][j].tolist() == [1] * lengths[j] + [0] * (width - lengths[j])
        assert batch["doc_tokens"][j].tolist() == (list(spec.prefix) + ids[:t[j].max() - 1]
                                                   + [spec.pad_id] * (width - lengths[j]))
    for i in range(b):
        prompt = batch["prompt_tokens"][i][batch["prompt_mask"][i] == 1]
        dt, ti = batch["doc_index"][i], batch["position"][i]
        assert batch["doc_visible"][i] == len(spec.prefix) + ti - 1
        assert batch["tail_tokens"][i].tolist() == [ids_of(dt)[ti - 1]] + list(spec.suffix)
        rebuilt = np.concatenate([batch["doc_tokens"][i // m, :batch["doc_visible"][i]],
                                  batch["tail_tokens"][i]])
        np.testing.assert_array_equal(rebuilt, prompt)
        assert prompt.tolist() == list(spec.prefix) + ids_of(dt)[:ti] + list(spec.suffix)
    for key in ("doc_tokens", "doc_mask", "doc_visible", "tail_tokens"):
        assert batch[key].dtype == np.int32, key


@pytest.mark.parametrize("chat", [False, True])
def test_document_groups_rebuild_every_prompt(smol, chat):
    """v0 (empty suffix) and v0 in SmolLM2's chat template (non-empty suffix), against
    transformers' token ids; the budget is small so long documents have truncated positions."""
    ref, tok = smol
    docs = real_docs(8)
    prefix, suffix = contexts.template_ids(tok, "v0", chat)
    assert bool(suffix) == chat
    m, room = 4, 60
    config = make_config(max_prompt_len=len(prefix) + len(suffix) + room, chat_template=chat,
                         contexts_per_doc=m, positions_per_doc=8)
    it = contexts.ContextIterator(config, "train", tok, 0, 1, documents=docs)
    spec = it.spec
    assert spec.budget == room
    ids = [ref.encode(x["text"], add_special_tokens=False) for x in docs]
    assert sum(len(x) > room + 1 for x in ids) >= 4  # positions past the budget exist
    # The examples: per_doc positions among min_context <= t <= budget, every document kept.
    per_doc = {d: min(8, min(len(x), room + 1) - 4) for d, x in enumerate(ids)}
    assert all(v >= m for v in per_doc.values())
    assert np.bincount(it.doc_index).tolist() == [per_doc[d] for d in range(len(docs))]
    assert it.num_examples == sum(v // m * m for v in per_doc.values())
    for batch in drain(it, 3):
        check_document_rows(batch, m, spec, lambda d: ids[d])


def test_templates_by_name_or_text(builtin):
    """data.template: a TEMPLATES name, or a researcher's own text around {prompt_content}."""
    own = "Guess what follows.\n{prompt_content}\nAnswer in \\boxed{}:"
    prefix, suffix = contexts.template_ids(builtin, own, chat=False)
    assert (prefix, suffix) == (builtin.encode("Guess what follows.\n"),
                                builtin.encode("\nAnswer in \\boxed{}:"))
    assert contexts.template_ids(builtin, "short", False) == contexts.template_ids(
        builtin, contexts.TEMPLATES["short"], False)
    for bad in ("v9", "no placeholder", "{prompt_content} twice {prompt_content}"):
        with pytest.raises(ValueError, match="is neither one of"):
            contexts.template_ids(builtin, bad, chat=False)


def test_make_batch_groups_and_errors(builtin):
    docs = contexts.tokenize_documents(builtin, [x["text"] for x in arith_docs(4)])
    spec = contexts.ExampleSpec.from_config(arith_config(), builtin)
    token_bytes = [builtin.token_bytes(i) for i in range(builtin.vocab_size)]
    d, t = [0, 0, 0, 2, 2, 2], [5, 9, 7, 30, 4, 12]
    batch = contexts.make_batch(docs, d, t, spec, token_bytes, group_size=3)
    check_document_rows(batch, 3, spec, lambda i: docs.doc(i).tolist())
    plain = contexts.make_batch(docs, d, t, spec, token_bytes)  # same keys, computed as before
    assert set(batch) - set(plain) == {"doc_tokens", "doc_mask", "doc_visible", "tail_tokens"}
    for key in plain:
        np.testing.assert_array_equal(batch[key], plain[key])
    wide = contexts.make_batch(docs, d, t, spec, token_bytes, group_size=3, doc_width=128)
    assert wide["doc_tokens"].shape == (2, 128)
    lead = dataclasses.replace(spec, lead=(1,))  # a tokenizer that starts texts with BOS = 1
    with_bos = contexts.make_batch(docs, d, t, lead, token_bytes)
    for i, (doc, pos) in enumerate(zip(d, t)):
        ctx = with_bos["context_tokens"][i][with_bos["context_mask"][i] == 1].tolist()
        assert ctx == [1] + docs.doc(doc).tolist()[max(0, pos - spec.max_prompt_len + 1):pos]
    with pytest.raises(ValueError, match="groups of data.contexts_per_doc=4"):
        contexts.make_batch(docs, d, t, spec, token_bytes, group_size=4)
    with pytest.raises(ValueError, match=r"rows 0\.\.1 hold documents \[0, 2\]"):
        contexts.make_batch(docs, [0, 2], [5, 6], spec, token_bytes, group_size=2)
    with pytest.raises(ValueError, match="outside"):
        contexts.make_batch(docs, [0, 0], [5, spec.budget + 1], spec, token_bytes, group_size=2)
    with pytest.raises(ValueError, match="doc_width=8"):
        contexts.make_batch(docs, d, t, spec, token_bytes, group_size=3, doc_width=8)


def test_contexts_after_a_bos_fit_their_bucket(builtin, monkeypatch):
    """A tokenizer with a BOS (Llama's) makes a context at position t BOS + t tokens long: its
    width comes from both, also when t is exactly a bucket size."""
    docs = arith_docs()
    probe = contexts.ContextIterator(arith_config(), "train", builtin, 0, 1, documents=docs)
    t_max = int(probe.position.max())
    config = arith_config()
    config.sampling.prompt_buckets = (t_max, 64, 128)  # t_max < 64: one batch's widest context
    monkeypatch.setattr(type(builtin), "leading_ids", property(lambda self: (1,)))
    it = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    widths = set()
    for batch in drain(it, -(-it.num_examples // 8)):  # one epoch: the t_max batch is in it
        widths.add(batch["context_tokens"].shape[1])
        for i, (d, t) in enumerate(rows(batch)):
            ctx = batch["context_tokens"][i][batch["context_mask"][i] == 1].tolist()
            assert ctx == [1] + it.docs.doc(d)[:t].tolist()
    assert 64 in widths


def test_ungrouped_stream_is_unchanged(builtin):
    """contexts_per_doc=1: global batch s is rows [s*B, (s+1)*B) of the (seed, epoch)
    permutation, made by make_batch without groups."""
    docs = arith_docs()
    it = contexts.ContextIterator(arith_config(), "train", builtin, 0, 1, documents=docs)
    n = it.num_examples
    assert n == len(it.doc_index) and it.get_state()["contexts_per_doc"] == 1
    stream = np.concatenate([np.random.default_rng([it.seed, e]).permutation(n) for e in (0, 1)])
    steps = n // 8 + 2  # into the second epoch
    for s, batch in enumerate(drain(it, steps)):
        rows = stream[s * 8:(s + 1) * 8]
        want = contexts.make_batch(it.docs, it.doc_index[rows], it.position[rows], it.spec,
                                   it.token_bytes)
        assert batch.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key])


def test_grouped_epochs_use_every_position(builtin):
    docs = arith_docs()
    m = 4
    config = arith_config(contexts_per_doc=m, positions_per_doc=6)
    it = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    counts = np.bincount(it.doc_index)
    assert it.num_examples == (counts // m * m).sum() and it.num_examples % m == 0
    assert (it.position <= it.spec.budget).all()
    per_epoch = it.num_examples // 8
    groups = it.global_rows(0).reshape(-1, m)
    for s in range(1, 12 * per_epoch):
        groups = np.concatenate([groups, it.global_rows(s).reshape(-1, m)])
    g = it.num_examples // m
    epochs = [groups[e * g:(e + 1) * g] for e in range(len(groups) // g)]
    assert len(epochs) >= 10
    for ep in epochs:
        docs_of = it.doc_index[ep]
        assert (docs_of == docs_of[:, :1]).all()
        assert len(set(ep.ravel().tolist())) == ep.size  # no context twice in an epoch
        # Each document gives floor(count / m) groups per epoch.
        np.testing.assert_array_equal(np.bincount(docs_of[:, 0], minlength=len(counts)),
                                      counts // m)
        assert (np.diff(docs_of[:, 0]) < 0).any()  # the groups' order is shuffled too
    assert not np.array_equal(np.sort(epochs[0], 1), np.sort(epochs[1], 1))
    assert set(np.concatenate(epochs).ravel().tolist()) == set(range(len(it.doc_index)))
    # Deterministic in (seed, data); the seed decides.
    again = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    np.testing.assert_array_equal(again.global_rows(per_epoch + 3),
                                  it.global_rows(per_epoch + 3))
    config.seed = 5
    other = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    assert not np.array_equal(other.global_rows(0), it.global_rows(0))


def test_grouped_hosts_and_restore(builtin):
    docs = arith_docs(60)
    config = arith_config(contexts_per_doc=2)
    single = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=docs)
    hosts = [contexts.ContextIterator(config, "train", builtin, p, 2, documents=docs)
             for p in range(2)]
    per_epoch = single.num_examples // 8
    for whole in drain(single, per_epoch + 2):  # across the epoch boundary
        parts = [next(h) for h in hosts]
        for key in whole:
            assert parts[0][key].shape == parts[1][key].shape, key
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        check_document_rows(whole, 2, single.spec, lambda d: single.docs.doc(d).tolist())
    # Exact restore, also across an epoch boundary, from a JSON round trip.
    it = hosts[1]
    for steps in (3, per_epoch):
        it.set_state(dict(it.get_state(), step=0))
        state = assert_resumes(it, config, builtin, docs, steps)
        assert state["contexts_per_doc"] == 2 and state["num_examples"] == it.num_examples
    ungrouped = contexts.ContextIterator(arith_config(), "train", builtin, 1, 2, documents=docs)
    with pytest.raises(ValueError, match="data.contexts_per_doc=1"):
        ungrouped.set_state(dict(state, num_examples=ungrouped.num_examples))
    with pytest.raises(ValueError, match="other data"):
        it.set_state(dict(state, contexts_per_doc=1))


def test_grouped_config_errors(builtin, caplog):
    from rpt_jax.config import validate
    docs = arith_docs(30) + [{"text": "1 + 1 = 2"}]  # too short for 4 positions
    with caplog.at_level(logging.WARNING):
        it = contexts.ContextIterator(arith_config(contexts_per_doc=4, min_context=2), "train",
                                      builtin, 0, 1, documents=docs)
    assert 30 not in it.doc_index and "1 documents with fewer than 4 positions" in caplog.text
    for m, hosts in ((3, 1), (4, 4), (0, 1)):
        with pytest.raises(ValueError, match=f"data.contexts_per_doc={m} must be >= 1 and divide"):
            contexts.ContextIterator(arith_config(contexts_per_doc=m), "train", builtin, 0, hosts,
                                     documents=docs)
    with pytest.raises(ValueError, match="no document has data.contexts_per_doc=8"):
        contexts.ContextIterator(arith_config(contexts_per_doc=8, positions_per_doc=6), "train",
                                 builtin, 0, 1, documents=docs)
    with pytest.raises(ValueError, match="contexts_per_doc=2 takes only positions t <= "):
        contexts.ContextIterator(arith_config(contexts_per_doc=2, min_context=200), "train",
                                 builtin, 0, 1, documents=docs)
    for m in (0, 3):
        with pytest.raises(ValueError, match=f"data.contexts_per_doc={m} must be >= 1"):
            validate(arith_config(contexts_per_doc=m), 8)
    with pytest.raises(ValueError, match=r"divisible by the mesh's data axes \(data\*fsdp=8\)"):
        validate(arith_config(contexts_per_doc=4), 8)  # 2 documents for 8 devices
    validate(arith_config(contexts_per_doc=4), 2)


def np_topk_entropy(logits, k):
    top = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -k:]
    p = np.exp(top - top.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


def test_topk_entropy_matches_numpy():
    logits = 3.0 * jax.random.normal(jax.random.key(0), (3, 5, 300))
    for k in (1, 4, 16):
        np.testing.assert_allclose(contexts.topk_entropy(logits, k=k), np_topk_entropy(logits, k),
                                   atol=1e-5)
    flat = np.zeros((2, 50), np.float32)  # uniform top-16: log 16
    np.testing.assert_allclose(contexts.topk_entropy(flat, k=16), np.log(16), rtol=1e-6)


def test_windows_cover_every_position_once():
    for n in (2, 5, 64, 65, 100, 200, 1000):
        got = []
        for start, end, keep in contexts._pieces(n, 64):
            assert end - start <= 64 and (start == 0 or end - start >= 33 or end == n)
            kept = list(range(max(start + 1, keep), end))
            assert all(p - start >= min(p, 32) for p in kept)  # at least half a window of context
            got += kept
        assert got == list(range(1, n))


WINDOW = 128
TINY = model_lib.ModelConfig(vocab_size=512, num_layers=2, hidden_size=32, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_dim=64, dtype="float32",
                             init_std=0.5)


@pytest.fixture(scope="module")
def scored(builtin):
    """Tokenized docs (short ones and one longer than two windows), params, mesh, entropies."""
    texts = [t for t in corpora.synthetic_texts(12, seed=5)]
    texts.append("".join(corpora.synthetic_texts(10, seed=6)))
    docs = contexts.tokenize_documents(builtin, texts)
    assert docs.lengths.max() > 2 * WINDOW and docs.lengths.min() < WINDOW // 2  # packed rows
    params = model_lib.init(TINY, jax.random.key(1))
    mesh = sharding.make_mesh(base_config("tiny"))
    ent = contexts.score_corpus(params, TINY, builtin, docs, mesh=mesh, window=WINDOW,
                                batch_rows=8, progress=False)
    return texts, docs, params, mesh, ent


def _window_entropies(docs, params, lead=()):
    """Reference: each window (after `lead`) alone, unpacked, on one device (right padding
    cannot change earlier positions under the causal mask)."""
    a = len(lead)
    windows = [(d, start, end, keep) for d in range(len(docs))
               for start, end, keep in contexts._pieces(int(docs.lengths[d]), WINDOW - a)]
    tokens = np.zeros((len(windows), WINDOW), np.int32)
    for i, (d, start, end, _) in enumerate(windows):
        tokens[i, :a + end - start] = list(lead) + docs.doc(d)[start:end].tolist()
    logits = np.asarray(jax.jit(lambda p, x: model_lib.forward(p, x, TINY))(params, tokens))
    refs = [np.full(n, np.nan) for n in docs.lengths]
    for i, (d, start, end, keep) in enumerate(windows):
        for p in range(max(start + 1, keep), end):
            refs[d][p] = np_topk_entropy(logits[i, a + p - start - 1], 16)
    return refs


def test_score_corpus_with_a_leading_bos(scored, builtin):
    """A tokenizer that starts texts with BOS (Llama's): every window is read after it."""
    _, docs, params, mesh, plain = scored
    bos = types.SimpleNamespace(vocab_size=builtin.vocab_size, source="bos", leading_ids=(1,))
    ent = contexts.score_corpus(params, TINY, bos, docs, mesh=mesh, window=WINDOW, batch_rows=8,
                                progress=False)
    for got, want in zip(ent, _window_entropies(docs, params, lead=(1,))):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(np.concatenate(ent)[1:], np.concatenate(plain)[1:], equal_nan=True)


def test_score_corpus_matches_numpy_reference(scored):
    _, docs, params, _, ent = scored
    refs = _window_entropies(docs, params)
    for d in range(len(docs)):
        assert len(ent[d]) == docs.lengths[d] and np.isnan(ent[d][0])
        assert np.isfinite(ent[d][1:]).all()
        np.testing.assert_allclose(ent[d], refs[d], atol=1e-4)
    spread = np.concatenate([e[1:] for e in ent])
    assert spread.std() > 0.05  # the filter below has something to separate


def test_entropy_filter_equals_reference(scored, builtin):
    texts, docs, _, _, ent = scored
    threshold = float(np.nanmedian(np.concatenate(ent)))
    config = make_config(max_prompt_len=512, positions_per_doc=0, entropy_threshold=threshold,
                         min_context=4)
    it = contexts.ContextIterator(config, "train", builtin, 0, 1,
                                  documents=[{"text": t} for t in texts], entropies=ent)
    want = {(d, p) for d in range(len(docs)) for p in range(4, docs.lengths[d])
            if ent[d][p] > threshold}
    assert set(zip(it.doc_index.tolist(), it.position.tolist())) == want
    batch = next(it)
    assert (batch["entropy"] > threshold).all()
    np.testing.assert_array_equal(
        batch["entropy"], [ent[d][p] for d, p in zip(batch["doc_index"], batch["position"])])


def test_entropy_cache_and_vocab_check(scored, builtin, tmp_path):
    _, docs, params, mesh, ent = scored
    folder = str(tmp_path / "cache")
    first = contexts.score_corpus(params, TINY, builtin, docs, mesh=mesh, window=WINDOW,
                                  batch_rows=8, cache_dir=folder, progress=False)
    assert sorted(os.listdir(folder)) == ["entropies.npy", "meta.json"]
    # A second call with the same window reads the cache: no params needed.
    again = contexts.score_corpus(None, TINY, builtin, docs, mesh=mesh, window=WINDOW,
                                  cache_dir=folder)
    for a, b, c in zip(first, again, ent):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-5)
    # Another window scores again and replaces the cache (nothing else left beside it).
    wider = contexts.score_corpus(params, TINY, builtin, docs, mesh=mesh, window=2 * WINDOW,
                                  batch_rows=8, cache_dir=folder, progress=False)
    with open(os.path.join(folder, "meta.json")) as f:
        assert json.load(f)["window"] == 2 * WINDOW
    assert os.listdir(tmp_path) == ["cache"]
    for a, b in zip(wider, contexts.load_entropies(folder, docs)):
        np.testing.assert_array_equal(a, b)
    other = contexts.TokenizedDocs(docs.tokens[:-1], np.minimum(docs.offsets, len(docs.tokens) - 1))
    with pytest.raises(ValueError, match="other documents"):
        contexts.load_entropies(folder, other)
    small = dataclasses.replace(TINY, vocab_size=256)
    with pytest.raises(ValueError, match="512 ids but the proxy model's vocabulary is 256"):
        contexts.score_corpus(None, small, builtin, docs, mesh=mesh)


def test_iterator_reads_the_proxy_cache(scored, builtin, tmp_path):
    texts, docs, params, mesh, _ = scored
    proxy = hf.save_params(params, TINY, tmp_path / "proxy")
    config = make_config(proxy_checkpoint=str(proxy), data_dir=str(tmp_path / "data"))
    config.model.dtype = "float32"
    documents = [{"text": t} for t in texts]
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        contexts.ContextIterator(config, "train", builtin, 0, 1, documents=documents)
    cfg = contexts.proxy_model_config(config, str(proxy))
    assert cfg.vocab_size == TINY.vocab_size and cfg.num_layers == TINY.num_layers
    folder = contexts.entropy_cache_dir(config.data.data_dir, "train", str(proxy), cfg, 16, docs)
    assert folder != contexts.entropy_cache_dir(config.data.data_dir, "train", str(proxy), cfg,
                                                16, docs, lead=(1,))  # windows after a BOS
    ent = contexts.score_corpus(params, cfg, builtin, docs, mesh=mesh, window=WINDOW,
                                batch_rows=8,
                                cache_dir=folder, progress=False)
    it = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=documents)
    for a, b in zip(it.entropies, ent):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(next(it)["entropy"]).all()


def test_to_global_places_rows_over_the_data_axes(builtin):
    config = arith_config()
    it = contexts.ContextIterator(config, "train", builtin, 0, 1, documents=arith_docs(20))
    batch = next(it)
    mesh = sharding.make_mesh(base_config("tiny"))
    out = contexts.to_global(batch, mesh)
    for key, x in out.items():
        assert x.shape == batch[key].shape
        assert x.sharding.spec[0] == sharding.BATCH
        np.testing.assert_array_equal(np.asarray(x), batch[key])


def test_prepare_data_script_builds_and_scores(tmp_path):
    """scripts/prepare_data.py end to end on the tiny config: corpus, then a cached entropy pass
    that the iterator finds."""
    config = base_config("tiny")
    config.model.dtype = "float32"
    cfg = model_lib.ModelConfig.from_config(config.model)
    proxy = hf.save_params(model_lib.init(cfg, jax.random.key(0)), cfg, tmp_path / "proxy")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "scripts", "prepare_data.py"),
           f"--config={os.path.join(root, 'configs', 'tiny.py')}", f"--workdir={tmp_path}",
           "--splits=validation", f"--config.data.proxy_checkpoint={proxy}",
           "--config.model.dtype=float32", "--entropy_window=256"]
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "validation: 207 documents" in out.stdout and "entropy of" in out.stdout, out.stdout
    # again with another window: the cached entropies do not apply, so the proxy is read again
    out = subprocess.run(cmd[:-1] + ["--entropy_window=128"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and "scoring again" in out.stderr, out.stderr[-3000:]
    tiny = _load_config(os.path.join(root, "configs", "tiny.py"))
    tiny.data.proxy_checkpoint = str(proxy)
    tiny.data.entropy_threshold = 1.0
    tiny.model.dtype = "float32"
    tok = tok_lib.load_tokenizer(tiny)
    it = contexts.ContextIterator(tiny, "validation", tok, 0, 1, data_dir=str(tmp_path / "tfds"))
    assert (next(it)["entropy"] > 1.0).all()


def _load_config(path):
    spec = importlib.util.spec_from_file_location("preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_documents_too_short_for_min_context_are_named(builtin):
    docs = [{"text": "1 + 1 = 2."}, {"text": "2 + 2 = 4."}]
    longest = max(len(builtin.encode(d["text"])) for d in docs)
    with pytest.raises(ValueError, match=rf"no examples from 2 documents .*the longest has "
                                         rf"{longest} tokens, data.min_context=64"):
        contexts.ContextIterator(make_config(min_context=64), "train", builtin, 0, 1,
                                 documents=docs)
