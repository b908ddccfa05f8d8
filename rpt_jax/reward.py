"""The next-token reasoning reward (paper Eq. 3 and its Appendix A variants), jitted and batched.

Definitions, for one sample (all on bytes; nothing is decoded or normalised):

- The response's byte stream is the concatenation of its tokens' bytes from the `ByteTable`
  (special tokens included, with whatever bytes the table gives them).
- The prediction: find the LAST occurrence of `think_end` in the stream (it may be one token or
  span several), then the LAST occurrence of `\\boxed{` anywhere in the stream. If that box marker
  starts before the end of `think_end` there is no box. Otherwise its content runs from just after
  the marker's `{` to the brace that balances it (LaTeX nests: `\\boxed{\\frac{1}{2}}` gives
  `\\frac{1}{2}`). If the last box is unclosed there is no prediction: we do NOT fall back to an
  earlier box, because the last box is the answer the policy committed to. In
  `\\boxed{a\\boxed{b}}` the last marker is the inner one, so the prediction is `b`.
- A prediction is invalid (reward 0 for every kind) when it is empty, longer than
  `max_pred_bytes` or than the target window's valid bytes, or when a special token (`<|im_end|>`,
  EOS, ...) lies inside the box: one of its bytes is in the content, or it has no bytes and sits
  between the marker's `{` and the closing `}`. Invalid UTF-8 is just bytes.
- correct (prefix_match, Eq. 3): l = len(pred) > 0, pred == target[:l], and l is one of the
  ground-truth token boundaries (cumulative byte lengths of the true tokens) with l <= target_len.
- first_token: l > 0, pred == target[:l] and l == boundaries[0] (the prediction is exactly the
  first ground-truth token's bytes).
- dense: 1 if correct, else target_prob, the model's probability of the true next token given
  the raw context (supplied by the caller).
- conditional_dense: rows form groups of `group_size` consecutive samples of one context; a group
  with at least one correct row gets the dense reward, a group with none gets 0 everywhere.

Special tokens matter only inside the box, so a `</think>` that is a special token is fine; a
byte-less token is invisible to the marker and brace search.

The device path never materialises the [N, T*W] byte stream. Per vocabulary entry it runs the two
marker-matching automata (KMP) from every state and counts braces ([V, W] work, independent of N).
Per sample, a scan over tokens carries each automaton's state (two table lookups per token);
cumulative sums give byte offsets and brace depth per token; the last marker ends and the
balancing brace are found at token level (bytes are read for at most two tokens per sample), and
only the `max_pred_bytes` window of the prediction is gathered. Everything is elementwise over the
leading sample axis, so it shards along N. Measured (scripts/bench_reward.py, one H200, jax
0.11.2): 4096 samples x 2048 tokens in 4.6 ms, 0.24 GiB peak.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BOX = b"\\boxed{"
KINDS = ("prefix_match", "first_token", "dense", "conditional_dense")
_OPEN, _CLOSE = ord("{"), ord("}")
_BIG = 1 << 30


class ByteTable(NamedTuple):
    """Each vocabulary entry's exact bytes. V vocabulary size, W the longest token in bytes."""
    bytes: jax.Array | np.ndarray  # [V, W] uint8, zero padded
    lengths: jax.Array | np.ndarray  # [V] int32, valid bytes per token
    special: jax.Array | np.ndarray  # [V] bool, special/control tokens


def byte_table_from_tokens(token_bytes: Sequence[bytes], special: Sequence[bool],
                           width: int | None = None) -> ByteTable:
    """Build a numpy ByteTable from each token's bytes; `width` defaults to the longest token."""
    if len(token_bytes) != len(special):
        raise ValueError(f"byte_table_from_tokens: {len(token_bytes)} tokens but "
                         f"{len(special)} special flags")
    longest = max((len(b) for b in token_bytes), default=0)
    width = max(longest, 1) if width is None else width
    if longest > width:
        raise ValueError(f"byte_table_from_tokens: a token has {longest} bytes > width {width}")
    table = np.zeros((len(token_bytes), width), np.uint8)
    for i, b in enumerate(token_bytes):
        table[i, :len(b)] = np.frombuffer(bytes(b), np.uint8)
    lengths = np.array([len(b) for b in token_bytes], np.int32)
    return ByteTable(table, lengths, np.asarray(special, bool))


# ----------------------------------------------------------------------------- reference

def reference_prediction(token_bytes: Sequence[bytes], special: Sequence[bool],
                         think_end: bytes = b"</think>") -> dict:
    """Plain-Python prediction extraction for one response (the definition, written directly).

    Returns has_think_end, has_box (a closed box after think_end), pred (bytes or None) and
    pred_special (a special token lies inside the box).
    """
    stream = b"".join(token_bytes)
    starts = np.cumsum([0] + [len(b) for b in token_bytes])[:-1].tolist()
    out = dict(has_think_end=False, has_box=False, pred=None, pred_special=False)
    end = stream.rfind(think_end)
    if end < 0:
        return out
    out["has_think_end"] = True
    start = stream.rfind(BOX)
    if start < end + len(think_end):
        return out
    depth, begin = 0, start + len(BOX)
    for i in range(begin, len(stream)):
        if stream[i] == _OPEN:
            depth += 1
        elif stream[i] == _CLOSE:
            if depth == 0:
                inside = [(b and a < i and a + len(b) > begin) or (not b and begin <= a <= i)
                          for a, b, sp in zip(starts, token_bytes, special) if sp]
                out.update(has_box=True, pred=stream[begin:i], pred_special=any(inside))
                return out
            depth -= 1
    return out


def reference_score(responses: Sequence[Sequence[bytes]], specials: Sequence[Sequence[bool]],
                    targets: Sequence[bytes], boundaries: Sequence[Sequence[int]], *,
                    kind: str = "prefix_match", think_end: bytes = b"</think>",
                    max_pred_bytes: int = 64, target_prob: Sequence[float] | None = None,
                    group_size: int | None = None) -> tuple[list[float], list[dict]]:
    """Plain-Python rewards for a batch: per-sample token bytes, their special flags, the valid
    target bytes and the ground-truth boundaries (zeros ignored). Same definitions as `score`."""
    think_end = think_end.encode() if isinstance(think_end, str) else think_end
    diags = []
    for toks, spec, target, bounds in zip(responses, specials, targets, boundaries):
        p = reference_prediction(toks, spec, think_end)
        pred = p["pred"]
        l = -1 if pred is None else len(pred)
        matched = 0
        if pred is not None:
            for a, b in zip(pred[:max_pred_bytes], target):
                if a != b:
                    break
                matched += 1
        valid = (pred is not None and 0 < l <= max_pred_bytes and l <= len(target)
                 and not p["pred_special"] and target[:l] == pred)
        first = int(bounds[0]) if len(bounds) else 0
        diags.append(dict(has_think_end=p["has_think_end"], has_box=p["has_box"], pred_len=l,
                          matched_len=matched, pred_special=p["pred_special"],
                          correct=valid and l in {int(b) for b in bounds if b > 0},
                          first_token_correct=valid and l == first))
    correct = [float(d["correct"]) for d in diags]
    if kind == "prefix_match":
        rewards = correct
    elif kind == "first_token":
        rewards = [float(d["first_token_correct"]) for d in diags]
    elif kind in ("dense", "conditional_dense"):
        rewards = [c if c else float(p) for c, p in zip(correct, target_prob)]
        if kind == "conditional_dense":
            for g in range(0, len(rewards), group_size):
                if not any(correct[g:g + group_size]):
                    rewards[g:g + group_size] = [0.0] * len(rewards[g:g + group_size])
    else:
        raise ValueError(f"reward kind {kind!r} is not one of {KINDS}")
    return rewards, diags


# ----------------------------------------------------------------------------- device path

def _kmp_dfa(pattern: bytes) -> tuple[np.ndarray, int]:
    """KMP automaton: next[state, byte] in 0..m (m = full match) and the state after a match."""
    m = len(pattern)
    dfa = np.zeros((m, 256), np.int32)
    dfa[0, pattern[0]] = 1
    restart = 0
    for j in range(1, m):
        dfa[j] = dfa[restart]
        dfa[j, pattern[j]] = j + 1
        restart = dfa[restart, pattern[j]]
    return dfa, int(restart)


def _vocab_tables(table_bytes, table_len, think_end: bytes):
    """Per vocabulary entry, from every entry state of the think_end and box automata (KMP):
    exit states [V, m] and last_end [V, m] (bytes consumed when the token's last full match
    completes, 0 if none), one pair per pattern; and the brace depth change [V] and the lowest
    running depth [V] (a large number for empty tokens).

    One scan over the W byte columns; its outputs are materialised, so XLA cannot fuse the
    per-vocabulary work into the per-token gathers that read these tables.
    """
    v, w = table_bytes.shape
    dfas = [(jnp.asarray(d.reshape(-1)), r, len(p))
            for p in (think_end, BOX) for d, r in [_kmp_dfa(p)]]

    def step(carry, col):
        states, lasts, depth, low = carry
        byte, j = col
        active = j < table_len
        new_states, new_lasts = [], []
        for (dfa, restart, m), state, last in zip(dfas, states, lasts):
            nxt = dfa[state * 256 + byte[:, None].astype(jnp.int32)]
            hit = (nxt == m) & active[:, None]
            new_lasts.append(jnp.where(hit, j + 1, last))
            new_states.append(jnp.where(active[:, None], jnp.where(hit, restart, nxt), state))
        depth = depth + jnp.where(active, (byte == _OPEN).astype(jnp.int32)
                                  - (byte == _CLOSE).astype(jnp.int32), 0)
        low = jnp.where(active, jnp.minimum(low, depth), low)
        return (new_states, new_lasts, depth, low), None

    init = ([jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (v, m)) for _, _, m in dfas],
            [jnp.zeros((v, m), jnp.int32) for _, _, m in dfas],
            jnp.zeros(v, jnp.int32), jnp.full(v, _BIG, jnp.int32))
    ((exit1, exit2), (last1, last2), depth, low), _ = jax.lax.scan(
        step, init, (table_bytes.T, jnp.arange(w, dtype=jnp.int32)))
    return exit1, last1, exit2, last2, depth, low


def _entry_states(trans1, trans2, tok, unroll: int = 16):
    """The state of each automaton entering each token, both started in state 0.

    trans1 [V', S1], trans2 [V', S2] int32: state after each vocabulary entry from each state;
    tok [N, T] ids into them. Returns two [N, T] int32. A scan over tokens carrying two [N]
    states: 2 gathers per token, which beats composing whole transition functions (S gathers
    per token per level) on both CPU and GPU; `unroll` lets XLA fuse consecutive steps.
    """
    s1, s2 = trans1.shape[1], trans2.shape[1]
    flat1, flat2 = trans1.reshape(-1), trans2.reshape(-1)

    def step(state, tk):
        a, b = state
        return (flat1[tk * s1 + a], flat2[tk * s2 + b]), state

    zero = jnp.zeros(tok.shape[0], jnp.int32)
    _, (a, b) = jax.lax.scan(step, (zero, zero), tok.T, unroll=unroll)
    return a.T, b.T


def _braces(b, n):
    """+1 for `{`, -1 for `}` on the first n bytes of each row, 0 elsewhere. b [..., W], n [...]."""
    live = jnp.arange(b.shape[-1]) < n[..., None]
    return jnp.where(live, (b == _OPEN).astype(jnp.int32) - (b == _CLOSE).astype(jnp.int32), 0)


def _take(x, idx):
    """x[n, idx[n]] for x [N, T] and idx [N]."""
    return jnp.take_along_axis(x, idx[:, None], axis=1)[:, 0]


def _check(tokens, lengths, table, target_bytes, target_len, boundaries, kind, think_end,
           max_pred_bytes, target_prob, group_size):
    def shape(name, x, ndim):
        if np.ndim(x) != ndim:
            raise ValueError(f"reward.score: {name} must have {ndim} dims, got shape {np.shape(x)}")
        return np.shape(x)

    n, t = shape("tokens", tokens, 2)
    for name, x, nd in (("lengths", lengths, 1), ("target_bytes", target_bytes, 2),
                        ("target_len", target_len, 1), ("boundaries", boundaries, 2)):
        if shape(name, x, nd)[0] != n:
            raise ValueError(f"reward.score: {name} has shape {np.shape(x)}, leading dim must be "
                             f"N={n} as in tokens {np.shape(tokens)}")
    v, w = shape("table.bytes", table.bytes, 2)
    if min(t, v, w, np.shape(boundaries)[1]) < 1:
        raise ValueError(f"reward.score: tokens {np.shape(tokens)}, table.bytes "
                         f"{np.shape(table.bytes)} and boundaries {np.shape(boundaries)} need "
                         f"non-empty dims")
    if np.shape(table.lengths) != (v,) or np.shape(table.special) != (v,):
        raise ValueError(f"reward.score: table.lengths {np.shape(table.lengths)} and table.special "
                         f"{np.shape(table.special)} must both be [V]=({v},)")
    if kind not in KINDS:
        raise ValueError(f"reward.score: kind={kind!r} is not one of {KINDS}")
    if not think_end or len(think_end) > 64:
        raise ValueError(f"reward.score: think_end must have 1..64 bytes, got {think_end!r}")
    if max_pred_bytes < 1:
        raise ValueError(f"reward.score: max_pred_bytes must be >= 1, got {max_pred_bytes}")
    if kind in ("dense", "conditional_dense") and (
            target_prob is None or np.shape(target_prob) != (n,)):
        raise ValueError(f"reward.score: kind={kind!r} needs target_prob of shape ({n},), got "
                         f"{None if target_prob is None else np.shape(target_prob)}")
    if kind == "conditional_dense" and (not group_size or n % group_size):
        raise ValueError(f"reward.score: kind='conditional_dense' needs group_size dividing "
                         f"N={n}, got {group_size}")


def score(tokens, lengths, table: ByteTable, target_bytes, target_len, boundaries, *,
          kind: str = "prefix_match", think_end: bytes | str = b"</think>",
          max_pred_bytes: int = 64, target_prob=None, group_size: int | None = None):
    """Rewards for N sampled responses (definitions in the module docstring). Jittable with the
    keyword arguments other than target_prob static; its core is jitted already.

    tokens [N, T] int32 response ids (ids at or after lengths[n] are ignored; ids outside the
    vocabulary are clipped into it); lengths [N] int32; table: the vocabulary's ByteTable;
    target_bytes [N, Wt] uint8 ground-truth continuation, target_len [N] int32 valid bytes of it;
    boundaries [N, K] int32 cumulative byte lengths of the true tokens, 0-padded;
    target_prob [N] float32 (dense kinds); group_size: samples per context (conditional_dense).

    Returns (reward [N] float32, diagnostics): has_think_end, has_box (a closed box after
    think_end), pred_len (bytes, -1 without a box), matched_len (common prefix of the first
    max_pred_bytes bytes of the prediction and target[:target_len], 0 without a box),
    pred_special (a special token inside the box), correct (Eq. 3, before any
    dense mixing), first_token_correct; all [N].
    """
    think_end = think_end.encode() if isinstance(think_end, str) else bytes(think_end)
    _check(tokens, lengths, table, target_bytes, target_len, boundaries, kind, think_end,
           max_pred_bytes, target_prob, group_size)
    diags = _diagnostics(tokens, lengths, table, target_bytes, target_len, boundaries,
                         think_end=think_end, max_pred_bytes=max_pred_bytes)
    return _mix(diags["correct"], diags["first_token_correct"], target_prob, kind=kind,
                group_size=group_size), diags


@functools.partial(jax.jit, static_argnames=("kind", "group_size"))
def _mix(correct, first, target_prob, *, kind: str, group_size: int | None):
    """The reward of each kind from the per-sample verdicts (module docstring)."""
    if kind == "prefix_match":
        return correct.astype(jnp.float32)
    if kind == "first_token":
        return first.astype(jnp.float32)
    reward = jnp.where(correct, 1.0, jnp.asarray(target_prob, jnp.float32))
    if kind == "conditional_dense":
        any_ok = jnp.any(correct.reshape(-1, group_size), axis=1, keepdims=True)
        reward = jnp.where(any_ok, reward.reshape(-1, group_size), 0.0).reshape(-1)
    return reward


@functools.partial(jax.jit, static_argnames=("think_end", "max_pred_bytes"))
def _diagnostics(tokens, lengths, table, target_bytes, target_len, boundaries, *,
                 think_end: bytes, max_pred_bytes: int) -> dict:
    """Per-sample prediction, match and verdicts (score's diagnostics), all [N]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    tb = jnp.asarray(table.bytes, jnp.uint8)
    tlen = jnp.asarray(table.lengths, jnp.int32)
    tspecial = jnp.asarray(table.special, bool)
    n, t = tokens.shape
    v, w = tb.shape
    m1, m2, mp = len(think_end), len(BOX), max_pred_bytes

    # Per vocabulary entry: both automata and the brace counts; a last row (id V) stands for
    # the ignored tokens past `lengths`: no bytes, identity transitions.
    exit1, last1, exit2, last2, delta, min_prefix = _vocab_tables(tb, tlen, think_end)
    pad = lambda x, row: jnp.concatenate([x, jnp.asarray(row, jnp.int32)[None]], axis=0)
    trans1, trans2 = pad(exit1, np.arange(m1)), pad(exit2, np.arange(m2))
    last1, last2 = pad(last1, np.zeros(m1)), pad(last2, np.zeros(m2))
    props = pad(jnp.stack([tlen, delta, min_prefix, tspecial.astype(jnp.int32)], axis=1),
                [0, 0, _BIG, 0])

    # Per sampled token: byte offsets, brace depth, automaton entry states, marker ends.
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    tok = jnp.where(valid, jnp.clip(tokens, 0, v - 1), v)
    tl, tdelta, tmin, tspec = jnp.moveaxis(props[tok], -1, 0)
    ends, depth_end = jnp.moveaxis(jnp.cumsum(jnp.stack([tl, tdelta], -1), axis=1), -1, 0)
    off, depth_start = ends - tl, depth_end - tdelta  # before each token
    entry1, entry2 = _entry_states(trans1, trans2, tok)
    e1 = last1.reshape(-1)[tok * m1 + entry1]
    e2 = last2.reshape(-1)[tok * m2 + entry2]
    think_pos = jnp.max(jnp.where(e1 > 0, off + e1, -1), axis=1)
    box_pos = jnp.where(e2 > 0, off + e2, -1)
    cs = jnp.max(box_pos, axis=1)  # first content byte of the last box marker
    t0 = jnp.argmax(box_pos, axis=1)
    has_think = think_pos >= 0
    box_after = has_think & (cs >= 0) & (cs - m2 >= think_pos)

    # The balancing brace: depth (count of { minus }) must fall one below its value at cs.
    jj = jnp.arange(w)[None, :]
    off0, d0 = _take(off, t0), _take(depth_start, t0)
    b0 = tb[jnp.minimum(_take(tok, t0), v - 1)]
    run0 = d0[:, None] + jnp.cumsum(_braces(b0, _take(tl, t0)), axis=1)
    j0 = cs - off0
    goal = _take(run0, jnp.clip(j0 - 1, 0, w - 1)) - 1
    hit0 = (jj >= j0[:, None]) & (jj < _take(tl, t0)[:, None]) & (run0 == goal[:, None])
    found0 = jnp.any(hit0, axis=1)
    later = (jnp.arange(t)[None, :] > t0[:, None]) & (depth_start + tmin <= goal[:, None])
    found1 = jnp.any(later, axis=1)
    t1 = jnp.argmax(later, axis=1)
    run1 = _take(depth_start, t1)[:, None] + jnp.cumsum(
        _braces(tb[jnp.minimum(_take(tok, t1), v - 1)], _take(tl, t1)), axis=1)
    hit1 = (jj < _take(tl, t1)[:, None]) & (run1 == goal[:, None])
    ce = jnp.where(found0, off0 + jnp.argmax(hit0, axis=1),
                   _take(off, t1) + jnp.argmax(hit1, axis=1))
    has_box = box_after & (found0 | found1)
    pred_len = jnp.where(has_box, ce - cs, -1)
    cs_, ce_ = cs[:, None], ce[:, None]
    inside = jnp.where(tl > 0, (off < ce_) & (ends > cs_), (off >= cs_) & (off <= ce_))
    pred_special = has_box & jnp.any((tspec > 0) & inside, axis=1)

    # Gather only the first max_pred_bytes bytes of the prediction.
    pos = cs[:, None] + jnp.arange(mp)[None, :]
    where_tok = jnp.clip(jax.vmap(lambda e, p: jnp.searchsorted(e, p, side="right"))(ends, pos),
                         0, t - 1)
    inside = jnp.clip(pos - jnp.take_along_axis(off, where_tok, axis=1), 0, w - 1)
    pred = tb[jnp.minimum(jnp.take_along_axis(tok, where_tok, axis=1), v - 1), inside]
    target_bytes = jnp.asarray(target_bytes, jnp.uint8)
    target_len = jnp.asarray(target_len, jnp.int32)
    target = jnp.pad(target_bytes, ((0, 0), (0, max(0, mp - target_bytes.shape[1]))))[:, :mp]
    kk = jnp.arange(mp)[None, :]
    same = (pred == target) & (kk < pred_len[:, None]) & (kk < target_len[:, None])
    matched = jnp.where(has_box, jnp.sum(jnp.cumprod(same, axis=1), axis=1), 0).astype(jnp.int32)

    boundaries = jnp.asarray(boundaries, jnp.int32)
    ok = (has_box & (pred_len > 0) & (pred_len <= mp) & (pred_len <= target_len)
          & (matched == pred_len) & ~pred_special)
    correct = ok & jnp.any((boundaries == pred_len[:, None]) & (boundaries > 0), axis=1)
    first = ok & (pred_len == boundaries[:, 0])
    return dict(has_think_end=has_think, has_box=has_box, pred_len=pred_len.astype(jnp.int32),
                matched_len=matched, pred_special=pred_special, correct=correct,
                first_token_correct=first)
