"""Next-token reasoning problems from a tokenized corpus, and the entropy pass that picks hard ones.

For a document x_0..x_n-1 and a position t, the context is the corpus token ids x_<t and the
ground truth is the continuation x_>=t (RPT, Section 3). A prompt is the template (default v0)
with the context where {prompt_content} stands. The context is never re-tokenised: the template
text before and after {prompt_content} is tokenised separately (with the chat template around
it when data.chat_template is set) and the corpus ids are spliced in between, so the prompt holds
exactly the ids x_<t and the ground-truth boundaries are exactly the corpus tokens' byte lengths.

Document groups (m = data.contexts_per_doc > 1): a batch's rows come in groups of m contexts cut
from one document at positions whose context is not left-truncated (t <= the budget), so every
prompt of the group is prefix + x_<t + suffix and the sampler can prefill prefix + x_<t_max-1
once for the whole group, then each context's tail [x_t-1] + suffix on top of the first
prefix_len + t - 1 slots (make_batch's doc_tokens / doc_visible / tail_tokens).

Shapes: B rows per host batch, P prompt length (a sampling.prompt_buckets size), C context
length (bucketed the same way), W = data.target_window bytes, K = data.target_tokens,
m = data.contexts_per_doc, L document-row length (bucketed), S = len(suffix).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rpt_jax import model as model_lib
from rpt_jax import sharding

log = logging.getLogger(__name__)

PROMPT_CONTENT = "{prompt_content}"
TEMPLATES = {
    # The paper's template v0 (used for all its RPT runs), verbatim.
    "v0": ("Complete the given text under '### Context' by predicting the next token, and wrap it "
           "in '\\boxed{}'. Please reason step by step to find the most probable next token as the "
           "final answer, and enclose it in \\boxed{} (note: the token may begin with a space, "
           "e.g., \\boxed{ para} or \\boxed{ =}; do not use \\text{}).\n### Context\n"
           "{prompt_content}"),
    # Our wording of the idea behind the paper's best zero-shot variant v6 (not its text): list
    # candidate tokens, then choose the most probable.
    "candidates": ("Predict the next token of the text under '### Context'. First list several "
                   "candidate next tokens and reason about how likely each is, then give the most "
                   "probable one as the final answer in \\boxed{} (the token may begin with a "
                   "space, e.g. \\boxed{ para}; do not use \\text{}).\n### Context\n"
                   "{prompt_content}"),
    # A short instruction for tiny models whose prompts are only ~128 tokens (our wording).
    "short": ("Predict the next token of the text under '### Context' and write it in "
              "\\boxed{}.\n### Context\n{prompt_content}"),
}
_SENTINEL = "\u27e6RPT-CONTEXT\u27e7"  # stands for the context while the chat template renders


# ----------------------------------------------------------------------------- tokenized corpus

class TokenizedDocs(NamedTuple):
    """Documents' token ids, concatenated: doc i is tokens[offsets[i]:offsets[i+1]]."""
    tokens: np.ndarray  # [N] int32
    offsets: np.ndarray  # [D + 1] int64

    def __len__(self):
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.offsets.astype(np.int64).tobytes())
        h.update(self.tokens.astype(np.int32).tobytes())
        return h.hexdigest()[:16]


def tokenize_documents(tokenizer, texts: Sequence[str], chunk: int = 1024) -> TokenizedDocs:
    """Token ids of each text; special-token text inside documents stays ordinary text."""
    ids = []
    for i in range(0, len(texts), chunk):
        ids += tokenizer.encode_batch(list(texts[i:i + chunk]), allow_special=False)
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), np.int32, count=int(offsets[-1]))
    return TokenizedDocs(flat, offsets)


# ----------------------------------------------------------------------------- positions

def select_positions(lengths, min_context: int, per_doc: int, seed: int, entropies=None,
                     threshold: float = 0.0, max_position: int | None = None):
    """Choose up to `per_doc` positions t per document (all when per_doc <= 0).

    Candidates are min_context <= t < n (and t >= 1; t <= max_position when given), and with
    `entropies` (one float array per document, NaN where unknown) only those with
    entropy[t] > threshold. The choice for document d depends only on (seed, d). Returns
    (doc_index [N] int32 ascending, position [N] int32, counts of documents skipped by reason).
    """
    docs, positions, skipped = [], [], {"too_short": 0, "no_position_above_threshold": 0}
    for d, n in enumerate(lengths):
        end = n if max_position is None else min(n, max_position + 1)
        cand = np.arange(max(min_context, 1), end)
        if cand.size == 0:
            skipped["too_short"] += 1
            continue
        if entropies is not None:
            with np.errstate(invalid="ignore"):
                cand = cand[np.asarray(entropies[d])[cand] > threshold]
            if cand.size == 0:
                skipped["no_position_above_threshold"] += 1
                continue
        if 0 < per_doc < cand.size:
            cand = np.sort(np.random.default_rng([seed, d]).choice(cand, per_doc, replace=False))
        docs.append(np.full(cand.size, d, np.int32))
        positions.append(cand.astype(np.int32))
    if not docs:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), skipped
    return np.concatenate(docs), np.concatenate(positions), skipped


# ----------------------------------------------------------------------------- examples

@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """What one example needs besides the corpus: the template's ids and the fixed sizes."""
    prefix: tuple  # token ids of the prompt before the context
    suffix: tuple  # token ids after it
    pad_id: int
    max_prompt_len: int
    buckets: tuple
    target_window: int
    target_tokens: int
    lead: tuple = ()  # ids a plain context starts with (the tokenizer's leading_ids: Llama's BOS)

    @classmethod
    def from_config(cls, config, tokenizer) -> "ExampleSpec":
        prefix, suffix = template_ids(tokenizer, config.data.template, config.data.chat_template)
        spec = cls(tuple(prefix), tuple(suffix), tokenizer.pad_id, config.data.max_prompt_len,
                   tuple(sorted(config.sampling.prompt_buckets)), config.data.target_window,
                   config.data.target_tokens, tuple(tokenizer.leading_ids))
        if spec.budget < 1:
            raise ValueError(f"template {config.data.template!r} takes {len(prefix) + len(suffix)} "
                             f"tokens, leaving no room for context in data.max_prompt_len="
                             f"{spec.max_prompt_len}")
        if spec.buckets[-1] < spec.max_prompt_len:
            raise ValueError(f"sampling.prompt_buckets={spec.buckets} has no bucket for "
                             f"data.max_prompt_len={spec.max_prompt_len}")
        return spec

    @property
    def budget(self) -> int:
        """Context tokens that fit in a prompt next to the whole template."""
        return self.max_prompt_len - len(self.prefix) - len(self.suffix)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)


def template_ids(tokenizer, name: str, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids of the prompt text before and after the context, tokenised separately, for a
    template of TEMPLATES or a template text (with {prompt_content} where the context goes). The
    prompt starts as transformers would start it: with the chat template's own BOS, else with
    the tokenizer's leading ids (Llama's BOS). The text after is a continuation: no '▁' before
    it from a SentencePiece vocabulary."""
    text = TEMPLATES.get(name, name)  # a name, or the template's own text
    if text.count(PROMPT_CONTENT) != 1:
        raise ValueError(f"data.template={name!r} is neither one of {sorted(TEMPLATES)} nor a "
                         f"text with {PROMPT_CONTENT} exactly once")
    before, after = text.split(PROMPT_CONTENT)
    if chat:
        rendered = tokenizer.apply_chat_template(before + _SENTINEL + after)
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the chat template altered the user text; cannot place the context")
        before, after = rendered.split(_SENTINEL)
        return tokenizer.encode(before), tokenizer.encode_continuation(after)
    return [*tokenizer.leading_ids, *tokenizer.encode(before)], tokenizer.encode_continuation(after)


def _left_pad(rows: list, width: int, fill: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(rows), width), fill, dtype)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return out, mask


def prompt_length(spec: ExampleSpec, positions: np.ndarray) -> np.ndarray:
    """Prompt tokens of examples at these positions (context left-truncated to the budget)."""
    return np.minimum(positions, spec.budget) + len(spec.prefix) + len(spec.suffix)


def context_length(spec: ExampleSpec, positions: np.ndarray) -> np.ndarray:
    """Tokens of the plain contexts at these positions: spec.lead, then the last corpus tokens,
    data.max_prompt_len in all."""
    keep = spec.max_prompt_len - len(spec.lead)
    return np.minimum(positions, keep) + len(spec.lead)


def doc_row_length(spec: ExampleSpec, positions: np.ndarray) -> np.ndarray:
    """Tokens of a document row prefix + x_<t-1 shared by contexts at positions <= t."""
    return len(spec.prefix) + np.asarray(positions) - 1


def make_batch(docs: TokenizedDocs, doc_index, position, spec: ExampleSpec, token_bytes,
               entropies=None, prompt_width: int | None = None,
               context_width: int | None = None, group_size: int = 1,
               doc_width: int | None = None) -> dict:
    """Fixed-shape examples for (doc_index[i], position[i]) pairs; see the module docstring.

    token_bytes: list of each vocabulary id's bytes. prompt_width / context_width / doc_width:
    the padded lengths P, C and L (default: the smallest bucket that fits these rows; a multi-host
    caller passes the global batch's, so every host has the same shapes).

    Returns prompt_tokens / prompt_mask [B, P] (left-padded), context_tokens / context_mask
    [B, C] (left-padded: spec.lead, then the last corpus tokens, data.max_prompt_len in all;
    the standard next-token accuracy reads them as transformers would), target_bytes [B, W] uint8,
    target_len [B], boundaries [B, K] (byte ends of the continuation's tokens, 0 past the window),
    target_tokens [B, K] (-1 past the document), entropy [B] (NaN without entropies), doc_index,
    position [B]. With group_size = m > 1, rows j*m .. j*m+m-1 must be one document's positions
    t <= spec.budget, and also (see document_rows):
      doc_tokens / doc_mask [B/m, L]: prefix + x_<t_max-1 of group j, right-padded;
      doc_visible [B]: len(prefix) + t - 1, the leading slots of its doc row a context reads;
      tail_tokens [B, 1 + S]: [x_t-1] + suffix,
    so that doc_tokens[i // m, :doc_visible[i]] + tail_tokens[i] is row i's unpadded prompt.
    """
    doc_index = np.asarray(doc_index, np.int32)
    position = np.asarray(position, np.int32)
    grouped = document_rows(docs, doc_index, position, spec, group_size, doc_width) \
        if group_size > 1 else {}
    w, k = spec.target_window, spec.target_tokens
    prompts, contexts = [], []
    b = len(doc_index)
    target_bytes = np.zeros((b, w), np.uint8)
    target_len = np.zeros(b, np.int32)
    boundaries = np.zeros((b, k), np.int32)
    target_tokens = np.full((b, k), -1, np.int32)
    entropy = np.full(b, np.nan, np.float32)
    keep = spec.max_prompt_len - len(spec.lead)  # corpus tokens of a context
    for i, (d, t) in enumerate(zip(doc_index, position)):
        ids = docs.doc(d)
        ctx = ids[max(0, t - spec.budget):t]
        prompts.append(np.concatenate([spec.prefix, ctx, spec.suffix]).astype(np.int32))
        contexts.append(np.concatenate([spec.lead, ids[max(0, t - keep):t]]).astype(np.int32))
        cont = ids[t:t + k]
        target_tokens[i, :len(cont)] = cont
        buf, total = bytearray(), 0
        for j, tok in enumerate(ids[t:]):
            piece = token_bytes[tok]
            total += len(piece)
            if j < k and total <= w:
                boundaries[i, j] = total
            buf += piece
            if len(buf) >= w:  # later tokens end beyond the window
                break
        buf = bytes(buf[:w])
        target_bytes[i, :len(buf)] = np.frombuffer(buf, np.uint8)
        target_len[i] = len(buf)
        if entropies is not None:
            entropy[i] = entropies[d][t]
    p = prompt_width or spec.bucket(max(map(len, prompts)))
    c = context_width or spec.bucket(max(map(len, contexts)))
    prompt_tokens, prompt_mask = _left_pad(prompts, p, spec.pad_id, np.int32)
    context_tokens, context_mask = _left_pad(contexts, c, spec.pad_id, np.int32)
    return dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
                context_tokens=context_tokens, context_mask=context_mask,
                target_bytes=target_bytes, target_len=target_len, boundaries=boundaries,
                target_tokens=target_tokens, entropy=entropy, doc_index=doc_index,
                position=position, **grouped)


def document_rows(docs: TokenizedDocs, doc_index, position, spec: ExampleSpec, group_size: int,
                  doc_width: int | None = None) -> dict:
    """One shared row per group of `group_size` contexts from one document (see make_batch).

    doc_index / position [B], grouped as rows j*m .. j*m+m-1. Returns doc_tokens, doc_mask
    [B/m, L] int32, doc_visible [B] int32 and tail_tokens [B, 1 + S] int32. Raises ValueError
    when B is not a multiple of m, a group mixes documents, or a context would be left-truncated
    (t > spec.budget: its prompt no longer starts with the document's beginning).
    """
    m = int(group_size)
    doc_index = np.asarray(doc_index, np.int32)
    position = np.asarray(position, np.int32)
    b = len(doc_index)
    if m < 1 or b % m:
        raise ValueError(f"{b} rows do not split into groups of data.contexts_per_doc={m}")
    d = doc_index.reshape(-1, m)
    t = position.reshape(-1, m)
    mixed = np.flatnonzero((d != d[:, :1]).any(1))
    if mixed.size:
        j = int(mixed[0])
        raise ValueError(f"rows {j * m}..{j * m + m - 1} hold documents "
                         f"{sorted(set(d[j].tolist()))}; each group of data.contexts_per_doc={m} "
                         f"rows must be one document's")
    bad = np.flatnonzero((position > spec.budget) | (position < 1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"row {i}: position {position[i]} of document {doc_index[i]} is outside "
                         f"[1, {spec.budget}] (the context budget), so its prompt would not "
                         f"start with the document's prefix; data.contexts_per_doc={m} needs "
                         f"untruncated contexts")
    lengths = doc_row_length(spec, t.max(1))
    width = doc_width or spec.bucket(int(lengths.max()))
    if width < lengths.max():
        raise ValueError(f"doc_width={width} < the longest document row ({int(lengths.max())})")
    doc_tokens = np.full((len(d), width), spec.pad_id, np.int32)
    doc_mask = np.zeros((len(d), width), np.int32)
    prefix = np.asarray(spec.prefix, np.int32)
    for j, n in enumerate(lengths):
        ids = docs.doc(d[j, 0])
        doc_tokens[j, :n] = np.concatenate([prefix, ids[:n - len(prefix)]])
        doc_mask[j, :n] = 1
    last = np.array([docs.doc(di)[ti - 1] for di, ti in zip(doc_index, position)], np.int32)
    tail_tokens = np.concatenate(
        [last[:, None], np.tile(np.asarray(spec.suffix, np.int32), (b, 1))], axis=1)
    return dict(doc_tokens=doc_tokens, doc_mask=doc_mask,
                doc_visible=doc_row_length(spec, position).astype(np.int32),
                tail_tokens=tail_tokens)


# ----------------------------------------------------------------------------- iterator

class ContextIterator:
    """Endless, deterministic per-host batches of RPT examples from one corpus split.

    The split's examples (document, position) are shuffled per epoch by a permutation seeded with
    (config.seed, epoch) and read as one stream; global batch s is stream rows [s*B, (s+1)*B).
    A host reads the rows `rows` of each batch: those its devices hold,
    `sharding.process_rows(mesh, B)` (a TPU host's need not be one block); default: host p's
    contiguous slice of B / process_count rows. `get_state()` / `set_state()` save and restore
    the position exactly.

    With m = data.contexts_per_doc > 1 the stream is one of document groups: positions are chosen
    only where the context is untruncated (t <= spec.budget), documents with fewer than m such
    positions are dropped, and each epoch (rng seeded with (config.seed, epoch)) shuffles each
    document's positions, cuts them into groups of m (the remainder waits for a later epoch's
    shuffle) and shuffles the groups. Global batch s is groups [s*B/m, (s+1)*B/m), group j in rows
    j*m .. j*m+m-1, and batches carry make_batch's doc_tokens / doc_mask / doc_visible /
    tail_tokens. Each host's rows must be whole groups; for the sampler, B/m
    doc rows split over the mesh's data*fsdp devices, which holds when every device's contexts
    are whole groups. num_examples is the contexts per epoch (groups * m when m > 1).

    data_dir: where corpora and entropy caches live (default data.data_dir; the trainer passes
    <workdir>/tfds). documents: optional sequence of {"text"} (default: the config's corpus
    split). data.positions_per_doc <= 0 takes every candidate position.
    entropies: optional per-document entropy arrays (default: the cached pass of
    data.proxy_checkpoint, or none); positions need entropy > data.entropy_threshold.
    """

    def __init__(self, config, split: str, tokenizer, process_index: int | None = None,
                 process_count: int | None = None, *, data_dir: str | None = None,
                 documents=None, entropies=None, proxy_checkpoint: str | None = None,
                 rows=None):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.global_batch = config.data.batch_size
        if rows is None:
            if self.global_batch % self.process_count:
                raise ValueError(f"data.batch_size={self.global_batch} is not divisible by the "
                                 f"{self.process_count} processes")
            if not 0 <= self.process_index < self.process_count:
                raise ValueError(f"process_index={self.process_index} outside "
                                 f"[0, {self.process_count})")
            n = self.global_batch // self.process_count
            rows = np.arange(self.process_index * n, (self.process_index + 1) * n)
        self.rows = np.asarray(rows, np.int64)
        self.local_batch = len(self.rows)
        self.group = m = int(config.data.contexts_per_doc)
        groups = self.rows.reshape(-1, m) if m >= 1 and self.local_batch % m == 0 else None
        if groups is None or np.any(groups != groups[:, :1] + np.arange(m)) or np.any(
                groups[:, 0] % m):
            raise ValueError(f"data.contexts_per_doc={m} must be >= 1 and divide each host's "
                             f"{self.local_batch} rows of a batch into whole groups "
                             f"(data.batch_size={self.global_batch})")
        self.seed = int(config.seed)
        self.spec = ExampleSpec.from_config(config, tokenizer)  # template errors before any work
        proxy = config.data.proxy_checkpoint if proxy_checkpoint is None else proxy_checkpoint
        threshold = float(config.data.entropy_threshold)
        if entropies is None and not proxy and threshold > 0:
            raise ValueError(f"data.entropy_threshold={threshold} needs data.proxy_checkpoint")
        corpus_key = split
        if documents is None:
            from rpt_jax import corpora
            documents = corpora.load_corpus(config, split, data_dir)
            corpus_key = documents.key
        self.docs = tokenize_documents(tokenizer, [d["text"] for d in documents])
        if entropies is None and proxy:
            entropies = load_entropies(entropy_cache_dir(
                data_dir or config.data.data_dir, corpus_key, proxy,
                proxy_model_config(config, proxy), config.data.entropy_top_k, self.docs,
                tokenizer.leading_ids), self.docs)
        if entropies is not None and [len(e) for e in entropies] != list(self.docs.lengths):
            raise ValueError("entropies do not match the documents' token counts")
        self.entropies = entropies
        self.token_bytes = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        # Grouped contexts must not be left-truncated, so only t <= budget are candidates.
        grouped_note = (f" (data.contexts_per_doc={self.group} takes only positions t <= "
                        f"{self.spec.budget}, the untruncated contexts)" if self.group > 1 else "")
        self.doc_index, self.position, skipped = select_positions(
            self.docs.lengths, config.data.min_context, config.data.positions_per_doc, self.seed,
            entropies, threshold, self.spec.budget if self.group > 1 else None)
        if any(skipped.values()):
            log.warning("%s: skipped documents %s%s", corpus_key, skipped, grouped_note)
        if not len(self.doc_index):
            longest = int(max(self.docs.lengths, default=0))
            raise ValueError(f"{corpus_key}: no examples from {len(self.docs)} documents "
                             f"(skipped {skipped}){grouped_note}; the longest has {longest} "
                             f"tokens, data.min_context={config.data.min_context}, "
                             f"data.entropy_threshold={threshold}")
        if self.group > 1:
            self._keep_whole_groups(corpus_key, int(config.data.positions_per_doc))
        log.info("%s: %d examples from %d documents", corpus_key, len(self.doc_index),
                 len(self.docs))
        self.step = 0
        self._epochs: dict[int, np.ndarray] = {}

    def _keep_whole_groups(self, corpus_key: str, per_doc: int) -> None:
        """Drop documents with fewer than m positions; record each document's run of rows."""
        m, budget = self.group, self.spec.budget
        counts = np.bincount(self.doc_index, minlength=len(self.docs))
        short = (counts > 0) & (counts < m)
        longer = int((self.docs.lengths > budget + 1).sum())
        if short.any() or longer:
            log.warning("%s: data.contexts_per_doc=%d: %d documents with fewer than %d positions "
                        "at t <= %d dropped (%d positions); %d documents have positions t > %d, "
                        "not used", corpus_key, m, int(short.sum()), m, budget,
                        int(counts[short].sum()), longer, budget)
        keep = counts[self.doc_index] >= m
        if not keep.any():
            raise ValueError(f"{corpus_key}: no document has data.contexts_per_doc={m} positions "
                             f"with an untruncated context (t <= {budget}; data.positions_per_doc="
                             f"{per_doc}, most per document: {int(counts.max())}); lower "
                             f"data.contexts_per_doc")
        self.doc_index, self.position = self.doc_index[keep], self.position[keep]
        counts = counts[counts >= m]
        self._run_start = np.repeat(np.cumsum(counts) - counts, counts)  # doc_index is ascending
        self._run_usable = np.repeat(counts // m * m, counts)
        self._grouped = int((counts // m * m).sum())

    @property
    def num_examples(self) -> int:
        """Contexts per epoch: every example when m = 1, the grouped ones when m > 1."""
        return len(self.doc_index) if self.group == 1 else self._grouped

    def _epoch(self, epoch: int) -> np.ndarray:
        """[num_examples / m, m] example indices of this epoch's groups, in stream order."""
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng([self.seed, epoch])
            if self.group == 1:
                self._epochs[epoch] = rng.permutation(self.num_examples)[:, None]
            else:
                # Shuffle within each document (random keys, sorted per document), cut each
                # document's first usable rows into groups, then shuffle the groups.
                order = np.lexsort((rng.random(len(self.doc_index)), self.doc_index))
                rank = np.arange(len(order)) - self._run_start
                groups = order[rank < self._run_usable].reshape(-1, self.group)
                self._epochs[epoch] = groups[rng.permutation(len(groups))]
        return self._epochs[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """Example indices [B] of global batch `step` (every host computes the same)."""
        per_epoch = self.num_examples // self.group
        per_batch = self.global_batch // self.group
        epochs, within = np.divmod(np.arange(step * per_batch, (step + 1) * per_batch), per_epoch)
        out = np.empty((per_batch, self.group), np.int64)
        for e in np.unique(epochs):
            out[epochs == e] = self._epoch(int(e))[within[epochs == e]]
        return out.reshape(-1)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = self.global_rows(self.step)
        self.step += 1
        pos = self.position[rows]
        # Widths from the global batch, so every host has the same shapes.
        p = self.spec.bucket(int(prompt_length(self.spec, pos).max()))
        c = self.spec.bucket(int(context_length(self.spec, pos).max()))
        width = (self.spec.bucket(int(doc_row_length(self.spec, pos).max()))
                 if self.group > 1 else None)
        mine = rows[self.rows]
        return make_batch(self.docs, self.doc_index[mine], self.position[mine], self.spec,
                          self.token_bytes, self.entropies, p, c, self.group, width)

    def get_state(self) -> dict:
        return {"step": int(self.step), "num_examples": int(self.num_examples), "seed": self.seed,
                "contexts_per_doc": self.group, "batch_size": self.global_batch}

    def set_state(self, state: dict) -> None:
        """Continue where `state` stopped. Saved with another data.batch_size, the stream goes
        on after the contexts already read when they make whole batches of this size."""
        # States saved before contexts_per_doc / batch_size existed: ungrouped, this batch size.
        group = int(state.get("contexts_per_doc", 1))
        if (int(state["num_examples"]) != self.num_examples or int(state["seed"]) != self.seed
                or group != self.group):
            raise ValueError(f"iterator state {state} was saved for other data: this iterator has "
                             f"{self.num_examples} examples, seed {self.seed} and "
                             f"data.contexts_per_doc={self.group}")
        read = int(state["step"]) * int(state.get("batch_size", self.global_batch))
        if read % self.global_batch:
            raise ValueError(f"iterator state {state}: {read} contexts read are not whole "
                             f"batches of data.batch_size={self.global_batch}; resume with a "
                             f"batch size that divides {read}")
        self.step = read // self.global_batch


def to_global(batch: dict, mesh) -> dict:
    """Each host's rows -> global jax arrays split over the mesh's data axes.

    Grouped batches' doc_tokens / doc_mask have B/m rows, split the same way: the sampler needs
    B/m divisible by the mesh's data*fsdp, which holds when each device's contexts are whole
    groups.
    """
    return {k: sharding.host_to_global(mesh, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- hard positions

@functools.partial(jax.jit, static_argnames="k")
def topk_entropy(logits, k: int = 16):
    """Entropy (nats) of the softmax over the k largest logits. logits [..., V] -> [...]."""
    top = jax.lax.top_k(logits.astype(jnp.float32), k)[0]
    logp = jax.nn.log_softmax(top, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@functools.lru_cache(maxsize=8)
def _scorer(cfg: model_lib.ModelConfig, k: int, chunk: int, mesh):
    """Jitted (params, tokens, positions, segment_ids) [b, L] -> entropies [b, L], replicated."""
    def score(params, tokens, positions, segment_ids):
        h, _ = model_lib.hidden_states(params, tokens, cfg, positions, segment_ids)
        b, t, d = h.shape
        # Logits for a chunk of positions at a time: [b, L, V] would not fit for a large vocab.
        hc = jnp.moveaxis(h.reshape(b, t // chunk, chunk, d), 1, 0)
        ent = jax.lax.map(lambda x: topk_entropy(model_lib.logits_from_hidden(params, x, cfg), k), hc)
        return jnp.moveaxis(ent, 0, 1).reshape(b, t)
    return jax.jit(score, out_shardings=sharding.replicated(mesh))


def _pieces(n: int, window: int):
    """Windows (start, end, keep_from) covering a document of n tokens: a window predicts
    tokens start+1..end-1, and keeps those >= keep_from; later windows overlap by window/2."""
    start, end = 0, min(n, window)
    out = [(start, end, 1)]
    while end < n:
        start = end - window // 2
        keep, end = end, min(n, start + window)
        out.append((start, end, keep))
    return out


def score_corpus(params, model_cfg: model_lib.ModelConfig, tokenizer, docs: TokenizedDocs, *,
                 mesh, top_k: int = 16, window: int = 1024, batch_rows: int = 32,
                 cache_dir: str | None = None, progress: bool = True) -> list[np.ndarray]:
    """Per-position top-k entropy of a proxy model over every document.

    Returns one float32 array per document: entry t is the entropy of the proxy's prediction of
    token t from x_<t (NaN for t = 0). Documents are cut into windows of `window` tokens (long
    ones overlapping by half), each after the tokenizer's leading ids (Llama's BOS), as
    transformers would read them, packed into rows with segment ids, and run in batches of
    `batch_rows` rows sharded over the mesh's data axes. With `cache_dir`, a finished result there
    is loaded instead if it was scored with the same window, else a new one is saved there
    (.npy + meta.json; by process 0). params: the proxy's, or a function returning them, called
    only when there is something to score (a cache hit loads no weights).
    """
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the "
                         f"proxy model's vocabulary is {model_cfg.vocab_size}")
    if len(docs.tokens) and int(docs.tokens.max()) >= model_cfg.vocab_size:
        raise ValueError(f"token id {int(docs.tokens.max())} >= model vocab {model_cfg.vocab_size}")
    chunk = min(128, window)
    window = -(-window // chunk) * chunk
    meta_path = os.path.join(cache_dir or "", "meta.json")
    if cache_dir and os.path.isfile(meta_path):
        with open(meta_path) as f:
            cached = json.load(f).get("window")
        if cached == window:
            return load_entropies(cache_dir, docs)
        log.warning("%s was scored with windows of %s tokens, not %d: scoring again", cache_dir,
                    cached, window)
    if callable(params):
        params = params()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_rows = -(-batch_rows // shards) * shards

    # Pack windows into rows: (row, column, segment, doc, start, end, keep_from) per window; a
    # window's tokens are lead + doc[start:end].
    lead = np.asarray(tokenizer.leading_ids, np.int32)
    n_lead = len(lead)
    placed, row, col, seg = [], 0, 0, 0
    for d, n in enumerate(docs.lengths):
        if n < 2:
            continue
        for start, end, keep in _pieces(int(n), window - n_lead):
            if col + n_lead + end - start > window:
                row, col, seg = row + 1, 0, 0
            seg += 1
            placed.append((row, col, seg, d, start, end, keep))
            col += n_lead + end - start
    num_rows = row + 1 if placed else 0
    num_batches = -(-num_rows // batch_rows)
    tokens = np.zeros((num_batches * batch_rows, window), np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for r, c, seg, d, start, end, _ in placed:
        tokens[r, c:c + n_lead + end - start] = np.concatenate([lead, docs.doc(d)[start:end]])
        positions[r, c:c + n_lead + end - start] = np.arange(n_lead + end - start)
        segments[r, c:c + n_lead + end - start] = seg

    fn = _scorer(model_cfg, top_k, chunk, mesh)
    in_sharding = sharding.batch_sharding(mesh, 2)
    put = lambda x: jax.make_array_from_callback(x.shape, in_sharding, lambda idx: x[idx])
    scores = np.zeros(tokens.shape, np.float32)
    from tqdm import tqdm
    with jax.set_mesh(mesh):
        for i in tqdm(range(num_batches), desc="entropy", disable=not progress):
            sl = slice(i * batch_rows, (i + 1) * batch_rows)
            scores[sl] = np.asarray(fn(params, put(tokens[sl]), put(positions[sl]),
                                       put(segments[sl])))

    out = [np.full(int(n), np.nan, np.float32) for n in docs.lengths]
    for r, c, _, d, start, end, keep in placed:
        # Column c + n_lead + j predicts token start + j + 1.
        targets = np.arange(start + 1, end)
        sel = targets >= keep
        out[d][targets[sel]] = scores[r, c + n_lead:c + n_lead + end - start - 1][sel]
    if cache_dir:
        sharding.on_process_zero("rpt_jax_entropy_cache", lambda: save_entropies(
            cache_dir, out, docs, dict(top_k=top_k, window=window, lead=lead.tolist())))
    return out


def proxy_model_config(config, proxy: str) -> model_lib.ModelConfig:
    """The proxy checkpoint's architecture with the run's compute dtypes."""
    from rpt_jax import hf
    return model_lib.ModelConfig(**hf.model_config_from_hf(proxy), dtype=config.model.dtype,
                                 param_dtype=config.model.param_dtype)


def check_proxy(config, proxy: str) -> model_lib.ModelConfig:
    """proxy_model_config, with the checkpoint's tensors checked from their file headers (cheap:
    run it before any data is prepared or anything compiles)."""
    from rpt_jax import hf
    cfg = proxy_model_config(config, proxy)
    hf.check_checkpoint(proxy, cfg)
    return cfg


def entropy_cache_dir(data_dir: str, corpus_key: str, proxy: str, model_cfg, top_k: int,
                      docs: TokenizedDocs, lead: tuple = ()) -> str:
    """Cache folder of an entropy pass: keyed by corpus split, proxy path and shape, k, tokens
    and the windows' leading ids (the tokenizer's `leading_ids`)."""
    if not data_dir:
        raise ValueError("no data directory for the entropy cache: set data.data_dir")
    fields = dataclasses.asdict(model_cfg)
    for irrelevant in ("remat", "init_std"):
        fields.pop(irrelevant)
    parts = [os.path.abspath(proxy), fields, top_k, docs.fingerprint()]
    key = json.dumps(parts + ([list(lead)] if lead else []), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(data_dir), "entropy", corpus_key, digest)


def save_entropies(folder: str, entropies: list, docs: TokenizedDocs, meta: dict) -> None:
    """Write entropies.npy (all documents concatenated) and meta.json, atomically."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    flat = np.concatenate(entropies) if entropies else np.zeros(0, np.float32)
    np.save(os.path.join(tmp, "entropies.npy"), flat.astype(np.float32), allow_pickle=False)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(dict(meta, num_docs=len(docs), num_tokens=int(docs.offsets[-1]),
                       tokens=docs.fingerprint()), f, indent=1)
    old = None
    if os.path.isdir(folder):  # swapped, not deleted first: never a partly written folder
        old = tempfile.mkdtemp(dir=parent, prefix=".old-")
        os.rename(folder, os.path.join(old, "entropy"))
    os.rename(tmp, folder)
    if old:
        shutil.rmtree(old)


def load_entropies(folder: str, docs: TokenizedDocs) -> list[np.ndarray]:
    """Read a cached entropy pass; raises if it is missing or was made for other tokens."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no cached entropies in {folder}: run scripts/prepare_data.py "
                                "with this config first")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["tokens"] != docs.fingerprint() or meta["num_docs"] != len(docs):
        raise ValueError(f"{folder} holds entropies for other documents or another tokenizer")
    flat = np.load(os.path.join(folder, "entropies.npy"), allow_pickle=False)
    return list(np.split(flat, docs.offsets[1:-1]))
