"""rollout.records: the logged rollouts read back as text, predictions as the reward reads them."""
import json

import numpy as np

from rpt_jax import reward, rollout
from rpt_jax.tokenizer import builtin_tokenizer


def test_records_show_text_predictions_and_rewards():
    tok = builtin_tokenizer(512)
    context = tok.encode("3 + 4 = 7.\n12 + 30 =")
    answers = ["<think>12 + 30</think>\\boxed{ 42}", "<think>no</think> 41", ""]
    ids = [tok.encode(a) + [tok.eos_id] if a else [] for a in answers]
    R = max(map(len, ids)) + 2
    tokens = np.full((3, R), tok.pad_id, np.int32)
    for r, row in enumerate(ids):
        tokens[r, :len(row)] = row
    tokens[2, 0] = 600  # beyond the tokenizer (an embedding padding row), after the end
    target = b" 42.\n"
    shown = dict(context_tokens=np.array([[0, 0] + context], np.int32),
                 context_mask=np.array([[0, 0] + [1] * len(context)], np.int32),
                 target_bytes=np.frombuffer(target + b"\0" * 3, np.uint8)[None],
                 target_len=np.array([len(target)], np.int32),
                 tokens=tokens, lengths=np.array([len(r) for r in ids], np.int32),
                 finished=np.array([True, True, False]), reward=np.array([1.0, 0.0, 0.0]))
    (rec,) = rollout.records(shown, tok, "</think>", 3)
    nan = rollout.records(dict(shown, reward=np.array([np.nan, 0.0, 0.0])), tok, "</think>", 3)
    assert nan[0]["samples"][0]["reward"] == "nan"  # as metrics.jsonl writes it: valid JSON
    json.dumps(nan, allow_nan=False)
    assert rec["context"] == "3 + 4 = 7.\n12 + 30 =" and rec["target"] == " 42.\n"
    got = [(s["response"], s["prediction"], s["reward"], s["tokens"], s["finished"])
           for s in rec["samples"]]
    assert got == [(answers[0] + "<|endoftext|>", " 42", 1.0, len(ids[0]), True),
                   (answers[1] + "<|endoftext|>", None, 0.0, len(ids[1]), True),
                   ("", None, 0.0, 0, False)]
    assert got[0][0] == tok.decode(ids[0])  # the bytes joined are the tokenizer's own text
    # the prediction is what the reference reward reads from the same tokens
    pieces = [tok.token_bytes(i) for i in ids[0]]
    assert reward.reference_prediction(pieces, [i in tok.special_ids for i in ids[0]])["pred"] \
        == b" 42"
    # long contexts: their last characters only
    long = dict(shown, context_tokens=np.array([tok.encode("1 + 1 = 2.\n" * 80)], np.int32))
    long["context_mask"] = np.ones_like(long["context_tokens"])
    text = rollout.records(long, tok, "</think>", 3)[0]["context"]
    assert len(text) == rollout.SHOWN_CONTEXT_CHARS and ("1 + 1 = 2.\n" * 80).endswith(text)
