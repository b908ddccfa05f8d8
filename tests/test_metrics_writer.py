"""MetricsWriter: JSONL records, resume drops what a killed run wrote after its checkpoint."""
import glob
import os

import numpy as np

from rpt_jax import metrics_writer


def tensorboard_events(workdir):
    """The events of the event files, file by file (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            n = int.from_bytes(data[i:i + 8], "little")
            yield event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4


def tensorboard_scalars(workdir) -> dict:
    """{(tag, step): value} of the event files."""
    return {(v.tag, e.step): v.simple_value
            for e in tensorboard_events(workdir) for v in e.summary.value}


def steps(workdir, kind=None):
    return [(r["kind"], r["step"]) for r in metrics_writer.read_metrics(workdir, kind)]


def test_records_scalars_and_tensorboard(tmp_path):
    w = metrics_writer.MetricsWriter(tmp_path)
    w.write(1, {"reward": np.float32(0.5), "finite": np.bool_(True), "n": np.int32(3),
                "loss": float("nan"), "vector": np.zeros(3), "eval/pass@4/all": 1.0})
    w.close()
    (rec,) = metrics_writer.read_metrics(tmp_path)
    assert rec["reward"] == 0.5 and rec["finite"] == 1 and rec["n"] == 3
    assert rec["loss"] == "nan" and "vector" not in rec  # JSON has no NaN; only scalars
    tb = tensorboard_scalars(tmp_path)  # a NaN loss is what TensorBoard must show too
    assert tb[("train/reward", 1)] == 0.5 and np.isnan(tb[("train/loss", 1)])
    assert metrics_writer._tag("eval", "eval/pass@4/all") == "eval/pass_at_4/all"
    assert metrics_writer._tag("train", "reward") == "train/reward"


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    w = metrics_writer.MetricsWriter(tmp_path, tensorboard=False)
    for s in (-2, -1):
        w.write(s, {"loss": 1.0}, kind="warmup")
    for s in range(1, 6):
        w.write(s, {"reward": 0.1})
    w.write(4, {"acc": 1.0}, kind="eval")
    w.close()
    with open(os.path.join(tmp_path, metrics_writer.JSONL), "a") as f:
        f.write('{"step": 6, "kind": "tr')  # a line cut short by kill -9
    w = metrics_writer.MetricsWriter(tmp_path, tensorboard=False, resume_step=3)
    w.write(4, {"reward": 0.2})
    w.close()
    assert steps(tmp_path) == [("warmup", -2), ("warmup", -1), ("train", 1), ("train", 2),
                               ("train", 3), ("train", 4)]
    assert metrics_writer.read_metrics(tmp_path, "train")[-1]["reward"] == 0.2


def test_fresh_run_starts_anew(tmp_path):
    w = metrics_writer.MetricsWriter(tmp_path)
    w.write(1, {"reward": 0.1})
    w.close()
    w = metrics_writer.MetricsWriter(tmp_path, resume_step=None)
    w.write(1, {"reward": 0.3})
    w.close()
    assert [r["reward"] for r in metrics_writer.read_metrics(tmp_path)] == [0.3]
    assert len(glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))) == 1


def test_only_process_zero_writes(tmp_path):
    w = metrics_writer.MetricsWriter(tmp_path, enabled=False)
    w.write(1, {"reward": 0.1})
    w.close()
    assert not os.path.exists(os.path.join(tmp_path, metrics_writer.JSONL))


def test_read_skips_a_line_cut_short(tmp_path):
    """A killed run's (or a live run's) last line, half written, is skipped, not an error."""
    w = metrics_writer.MetricsWriter(tmp_path, tensorboard=False)
    for s in (1, 2):
        w.write(s, {"reward": 0.1})
    w.close()
    with open(os.path.join(tmp_path, metrics_writer.JSONL), "a") as f:
        f.write('{"step": 3, "kind": "train", "rew')
    assert steps(tmp_path, "train") == [("train", 1), ("train", 2)]
    assert steps(tmp_path) == [("train", 1), ("train", 2)]


def test_samples_resume_and_tensorboard_text(tmp_path):
    rec = {"context": "7 * 8 =", "target": " 56", "samples": [
        {"response": "<think></think>\\boxed{ 56}", "prediction": " 56", "reward": 1.0,
         "tokens": 9, "finished": True}]}
    w = metrics_writer.MetricsWriter(tmp_path)
    for s in (2, 4, 6):
        w.write_samples(s, [rec, rec])
    w.close()
    w = metrics_writer.MetricsWriter(tmp_path, resume_step=4)  # a kill after checkpoint 4
    w.close()
    got = metrics_writer.read_samples(tmp_path)
    assert [(r["step"], r["context_index"]) for r in got] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert {k: got[0][k] for k in rec} == rec
    texts = [(v.tag, e.step, v.tensor.string_val[0].decode())
             for e in tensorboard_events(tmp_path) for v in e.summary.value
             if v.tensor.string_val]
    assert {(t, s) for t, s, _ in texts} == {(f"samples/{i}/text_summary", s)
                                             for i in (0, 1) for s in (2, 4, 6)}
    assert "**sample 0**: reward 1, prediction `' 56'`, 9 tokens" in texts[0][2]
    metrics_writer.MetricsWriter(tmp_path).close()  # a fresh run starts anew
    assert metrics_writer.read_samples(tmp_path) == []
