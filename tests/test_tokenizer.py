"""rpt_jax.tokenizer against transformers' SmolLM2 tokenizer on real multi-byte text, a
hand-built SentencePiece-style (Metaspace + byte fallback) vocabulary, and the built-in BPE."""
import json

import numpy as np
import pytest
import tokenizers
import transformers
from hypothesis import given, settings, strategies as st

from rpt_jax import tokenizer as tok_lib
from rpt_jax.config import base_config
from real_text import MULTIBYTE, champ_problem, wiki_leads

EXTRA = MULTIBYTE


def real_texts(n=30):
    """Wikipedia leads that contain non-ASCII characters, a CHAMP problem, and EXTRA."""
    return wiki_leads(n) + [champ_problem(), EXTRA]


def test_ids_and_bytes_match_transformers_on_real_text(smol):
    hf, tok = smol
    texts = real_texts()
    assert sum(not t.isascii() for t in texts) >= 20
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
        assert tok.decode(ids) == hf.decode(ids) == text


def test_every_token_bytes_match_transformers_decode(smol):
    """Each token whose bytes are valid UTF-8 decodes (transformers) to exactly those bytes; the
    others are fragments of multi-byte characters, which transformers shows as U+FFFD."""
    hf, tok = smol
    assert tok.vocab_size == len(hf) == 49152
    decoded = hf.batch_decode([[i] for i in range(tok.vocab_size)])
    fragments = 0
    for i, text in enumerate(decoded):
        b = tok.token_bytes(i)
        try:
            assert b.decode("utf-8") == text, i
        except UnicodeDecodeError:
            fragments += 1
            assert "\ufffd" in text, i
    assert 0 < fragments < 1000


def test_special_tokens_and_chat_template(smol):
    hf, tok = smol
    assert tok.eos_id == hf.eos_token_id and tok.pad_id == hf.pad_token_id
    assert tok.bos_id == hf.bos_token_id
    assert tok.special_ids == frozenset(hf.all_special_ids) | {
        i for i, t in hf.added_tokens_decoder.items() if t.special}
    for user in ["hi", EXTRA, "a {{ b }} {% c %}"]:
        assert tok.apply_chat_template(user) == hf.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(user, add_generation_prompt=False) == hf.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=False)
    # Special-token text: recognised by default (like transformers), plain text for corpora.
    assert tok.encode("a<|im_end|>b") == hf.encode("a<|im_end|>b", add_special_tokens=False)
    assert tok.eos_id in tok.encode("a<|im_end|>b")
    plain = tok.encode("a<|im_end|>b", allow_special=False)
    assert tok.eos_id not in plain and tok.decode(plain) == "a<|im_end|>b"


def test_byte_table(smol):
    _, tok = smol
    table = tok.byte_table()
    v = tok.vocab_size
    assert table.bytes.shape[0] == v and table.bytes.dtype == np.uint8
    for i in [0, 2, 100, 1000, 30000, v - 1]:
        b = tok.token_bytes(i)
        assert table.lengths[i] == len(b)
        assert table.bytes[i, :len(b)].tobytes() == b and not table.bytes[i, len(b):].any()
    assert set(np.flatnonzero(table.special)) == set(tok.special_ids)


def test_save_round_trip(smol, tmp_path):
    hf, tok = smol
    tok.save(tmp_path)
    again = tok_lib.Tokenizer.from_dir(tmp_path)
    assert (again.eos_id, again.bos_id, again.pad_id, again.vocab_size) == (
        tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size)
    assert again.chat_template == tok.chat_template
    assert again.encode(EXTRA) == tok.encode(EXTRA)
    # transformers reads the saved folder too.
    hf2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf2.encode(EXTRA, add_special_tokens=False) == tok.encode(EXTRA)
    assert hf2.eos_token_id == tok.eos_id


def test_generation_config_end_ids(smol, tmp_path):
    """generation_config.json's eos_token_id (Llama 3 Instruct lists <|eot_id|> besides EOS) ends
    samples too: end_ids, special, the sampler's stop ids; saved and read back; ids outside the
    vocabulary are named."""
    from rpt_jax import config as config_lib
    from rpt_jax import evaluation
    _, tok = smol
    tok.save(tmp_path)
    assert tok_lib.Tokenizer.from_dir(tmp_path).end_ids == (tok.eos_id,)
    assert not (tmp_path / "generation_config.json").exists()
    im_start = tok.token_to_id("<|im_start|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_start, 2]}))
    again = tok_lib.Tokenizer.from_dir(tmp_path)
    assert again.end_ids == tuple(sorted({tok.eos_id, im_start, 2}))
    assert im_start in again.special_ids
    config = config_lib.base_config("smollm2_135m")
    assert set(again.end_ids) <= set(evaluation.stop_ids(config, again))
    again.save(tmp_path / "copy")
    assert tok_lib.Tokenizer.from_dir(tmp_path / "copy").end_ids == again.end_ids
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(ValueError, match=r"generation_config.json eos_token_id \[1000000\]"):
        tok_lib.Tokenizer.from_dir(tmp_path)


def _metaspace_tokenizer():
    """A SentencePiece-style BPE: '▁' for spaces, <0xNN> pieces for bytes not in the vocab."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "t", "h", "e", "a", "c", "f", "é", "▁t", "▁th", "▁the", "ca", "caf", "café",
               "▁café"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("c", "a"), ("ca", "f"), ("caf", "é"),
              ("▁", "café")]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>",
                                                     byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁",
                                                            prepend_scheme="always")
    tok.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(),
        tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok_lib.Tokenizer(tok, {"eos_token": "</s>", "bos_token": "<s>"})


def test_metaspace_byte_fallback_bytes():
    tok = _metaspace_tokenizer()
    assert tok.token_bytes(tok.token_to_id("<0xE6>")) == b"\xe6"
    assert tok.token_bytes(tok.token_to_id("▁café")) == " café".encode()
    assert (tok.eos_id, tok.bos_id) == (2, 1) and tok.special_ids == {0, 1, 2}
    for text in ["the café", "the 東京 café 🍣", "zoë thé"]:
        ids = tok.encode(text)
        assert tok.token_to_id("<0xE6>") in ids or "東" not in text
        # The prepended '▁' is a real leading space in the pieces' bytes.
        assert b"".join(tok.token_bytes(i) for i in ids) == (" " + text).encode("utf-8")


def test_prompts_start_as_transformers_starts_them(smol, tmp_path):
    """A tokenizer whose post-processor adds BOS (Llama's) starts a plain prompt with it, as
    transformers' tokenizer(text) does; SmolLM2's adds nothing."""
    from rpt_jax import contexts
    llama_like = _metaspace_tokenizer()
    llama_like._tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    before = contexts.TEMPLATES["short"].split(contexts.PROMPT_CONTENT)[0]
    for tok, lead in ((llama_like, (1,)), (smol[1], ())):
        assert tok.leading_ids == lead
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tok)
        prefix, _ = contexts.template_ids(tok, "short", chat=False)
        assert prefix == hf(before).input_ids
    # A folder as transformers 5 reads it: the post-processor decides, whatever
    # tokenizer_config.json's add_bos_token says.
    for post in (None, llama_like._tok.post_processor):
        for add_bos in (True, False, None):
            raw = _metaspace_tokenizer()._tok
            if post is not None:
                raw.post_processor = post
            folder = tmp_path / f"{post is None}_{add_bos}"
            folder.mkdir()
            raw.save(str(folder / "tokenizer.json"))
            config = {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>",
                      "tokenizer_class": "LlamaTokenizerFast"}
            if add_bos is not None:
                config["add_bos_token"] = add_bos
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
            hf = transformers.AutoTokenizer.from_pretrained(str(folder))
            ours = tok_lib.Tokenizer.from_dir(folder)
            assert list(ours.leading_ids) == hf("the").input_ids[:-1] == [1] * (post is not None)


def test_text_after_the_context_gets_no_word_start_space(smol):
    """SentencePiece vocabularies put '▁' (a space) before a text's first word; the template's
    text after the context continues it, so its bytes are exactly its text's. Byte-level
    vocabularies (SmolLM2) add nothing either way."""
    from rpt_jax import contexts
    legacy = _legacy_sentencepiece()
    for tok, texts in ((_metaspace_tokenizer(), ("\nA: the", "the café", " the")),
                       (legacy, ("a b", " b a", "ba")), (smol[1], ("\nA: the", "café"))):
        for text in texts:
            ids = tok.encode_continuation(text)
            assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
        _, after = contexts.template_ids(tok, "Q: {prompt_content}" + texts[0], chat=False)
        assert b"".join(tok.token_bytes(i) for i in after) == texts[0].encode()
    assert legacy.encode_continuation("a b") == [4, 7]  # 'a', '▁b'
    assert smol[1].encode_continuation("x = 1") == smol[1].encode("x = 1")


def _legacy_sentencepiece():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6, "▁b": 7}
    raw = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("▁", "a"), ("▁", "b")],
                                                     unk_token="<unk>"))
    raw.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("▁"),
                                                      tokenizers.normalizers.Replace(" ", "▁")])
    raw.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.Fuse(),
        tokenizers.decoders.Strip(" ", 1, 0)])
    raw.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok_lib.Tokenizer(raw, {"eos_token": "</s>"})


def test_sentencepiece_vocabulary_without_metaspace_or_byte_fallback():
    """Llama-2-style pieces: '▁' only in a Prepend/Replace normalizer and a Replace decoder."""
    tok = _legacy_sentencepiece()
    raw = tok._tok
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw)
    assert tok.token_bytes(6) == b" a"
    for text in ["a b", "ab ba  b"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == (" " + text).encode()
        assert tok.decode(ids) == hf.decode(ids) == text


def _byte_level_dir(folder, config, special_tokens_map=None):
    """A tiny byte-level BPE folder: tokenizer.json, the given tokenizer_config.json and, when
    given, special_tokens_map.json."""
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    raw.train_from_iterator(["hello world"], tokenizers.trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    raw.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return folder


def test_special_tokens_map(tmp_path):
    """special_tokens_map.json, as transformers reads it: merged over tokenizer_config.json when
    that has no added_tokens_decoder (folders saved before transformers 4.34), else ignored. The
    exported config.json takes its token ids from the same merge."""
    import jax.numpy as jnp  # noqa: F401  (rpt_jax.hf imports jax)
    from rpt_jax import config as config_lib
    from rpt_jax import hf as hf_lib
    from rpt_jax import model
    im_end = {"content": "<|im_end|>", "lstrip": False, "rstrip": False, "normalized": False,
              "single_word": False, "special": True}
    cases = {  # name: (tokenizer_config.json, special_tokens_map.json)
        "missing": ({}, {"eos_token": im_end, "bos_token": "<|im_start|>", "pad_token": "<|pad|>",
                         "unk_token": "<|endoftext|>"}),
        "both": ({"eos_token": "<|endoftext|>", "bos_token": "<|im_start|>"},
                 {"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}),
        "decoder": ({"eos_token": "<|endoftext|>", "added_tokens_decoder": {"2": im_end}},
                    {"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}),
    }
    cfg = model.ModelConfig(**config_lib.model_shape("tiny"))
    for name, (config, special_tokens_map) in cases.items():
        folder = _byte_level_dir(tmp_path / name, config, special_tokens_map)
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        tok = tok_lib.Tokenizer.from_dir(folder)
        assert (tok.eos_id, tok.bos_id) == (hf.eos_token_id, hf.bos_token_id), name
        assert tok.pad_id == (tok.eos_id if hf.pad_token_id is None else hf.pad_token_id), name
        exported = hf_lib.hf_config(cfg, "float32", tokenizer_dir=folder)
        assert {k: exported.get(f"{k}_token_id") for k in ("bos", "eos", "pad")} == {
            "bos": hf.bos_token_id, "eos": hf.eos_token_id, "pad": hf.pad_token_id}, name
    assert tok_lib.Tokenizer.from_dir(tmp_path / "missing").eos_id == 2


def test_chat_template_variables_as_transformers(tmp_path):
    """Special tokens that are not set are undefined (`{{ bos_token }}` prints nothing, not
    'None'); tools and documents are None."""
    template = (
        "{{ bos_token }}|{{ pad_token is defined }}|{{ eos_token }}|"
        "{% if tools is not none %}{{ tools | tojson }}{% endif %}"
        "{% if documents is not none %}{{ documents | tojson }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for name, config in [("eos", {"eos_token": "<|im_end|>"}),
                         ("all", {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
                                  "pad_token": "<|pad|>", "unk_token": "<|endoftext|>"})]:
        folder = _byte_level_dir(tmp_path / name, {**config, "chat_template": template})
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        tok = tok_lib.Tokenizer.from_dir(folder)
        for add in (True, False):
            want = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=add)
            assert tok.apply_chat_template("hi", add_generation_prompt=add) == want
        assert want.startswith("<|im_start|>|True|" if name == "all" else "|False|")


def test_chat_template_date_is_fixed(tmp_path, monkeypatch):
    """A template printing today's date (Llama 3.x) gets TEMPLATE_DATE whatever the clock says,
    so a run's prompts are the same every day."""
    import datetime

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2031, 1, 2)
    template = ('{{ "Today Date: " + strftime_now("%d %b %Y") }}|'
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    folder = _byte_level_dir(tmp_path, {"eos_token": "<|im_end|>", "chat_template": template})
    tok = tok_lib.Tokenizer.from_dir(folder)
    assert tok.apply_chat_template("hi") == "Today Date: 26 Jul 2024|hi"
    monkeypatch.setattr(datetime, "datetime", Later)
    tok_lib._compile.cache_clear()
    assert tok.apply_chat_template("hi") == "Today Date: 26 Jul 2024|hi"


def test_unsupported_vocabulary_and_missing_files(tmp_path):
    wp = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="unsupported tokenizer vocabulary"):
        tok_lib.Tokenizer(wp, {"eos_token": "[UNK]"})
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        tok_lib.Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        tok_lib.Tokenizer.from_file(tmp_path / "nope.json")


@pytest.fixture(scope="module")
def builtin():
    return tok_lib.builtin_tokenizer(512)


def test_train_bpe_deterministic_and_sized(builtin):
    again = tok_lib.builtin_tokenizer(512)
    assert again._tok.to_str() == builtin._tok.to_str()
    assert builtin.vocab_size == 512
    assert [builtin.token_to_id(t) for t in tok_lib.BUILTIN_SPECIAL_TOKENS] == list(range(5))
    assert builtin.eos_id == 0 and builtin.special_ids == frozenset(range(5))
    assert builtin.token_bytes(builtin.token_to_id("</think>")) == b"</think>"
    small = tok_lib.train_bpe(["ab ab ab"], 300)  # too little text: padded with unused ids
    assert small.vocab_size == 300


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_builtin_bytes_round_trip_any_text(builtin, text):
    ids = builtin.encode(text, allow_special=False)
    assert b"".join(builtin.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert builtin.decode(ids) == text


def test_load_tokenizer(tmp_path, builtin, smol):
    config = base_config("tiny")
    assert load_ids(tok_lib.load_tokenizer(config)) == load_ids(builtin)
    builtin.save(tmp_path)
    config.data.tokenizer = str(tmp_path)
    assert load_ids(tok_lib.load_tokenizer(config)) == load_ids(builtin)
    config.data.tokenizer = str(tmp_path / "tokenizer.json")
    assert load_ids(tok_lib.load_tokenizer(config)) == load_ids(builtin)
    # a tokenizer.json path reads its folder's settings, as the folder does (SmolLM2's EOS is
    # <|im_end|>, not the fallback <|endoftext|>)
    hf, smol_tok = smol
    smol_tok.save(tmp_path / "smol")
    config.model.vocab_size = smol_tok.vocab_size
    for path in (tmp_path / "smol", tmp_path / "smol" / "tokenizer.json"):
        config.data.tokenizer = str(path)
        tok = tok_lib.load_tokenizer(config)
        assert (tok.eos_id, tok.pad_id, tok.chat_template) == (
            hf.eos_token_id, hf.pad_token_id, smol_tok.chat_template) and tok.chat_template
    (tmp_path / "smol" / "generation_config.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"smol/generation_config\.json is not valid JSON"):
        tok_lib.load_tokenizer(config)
    config.data.tokenizer = str(tmp_path / "tokenizer.json")
    config.model.vocab_size = 256
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        tok_lib.load_tokenizer(config)


def load_ids(tok):
    return tok.encode("12 + 30 = 42.\n### Context\n")


def test_unreadable_tokenizer_and_failing_chat_template_are_named(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    for load in (lambda: tok_lib.Tokenizer.from_file(bad),
                 lambda: tok_lib.Tokenizer.from_dir(tmp_path)):
        with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer\.json"):
            load()
    tok = tok_lib.builtin_tokenizer(512)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match=r"its chat template fails on one user turn .*roles "
                                         r"must alternate.*data\.chat_template=False"):
        tok.apply_chat_template("hi")
