"""Tokenizer over a Hugging Face tokenizer.json: ids, each token's exact bytes, chat templates.

The reward compares bytes, so every token's exact byte string matters: byte-level BPE vocabularies
(GPT-2, Llama-3, Qwen2, SmolLM2) store bytes through GPT-2's `bytes_to_unicode` map; SentencePiece
style vocabularies (Metaspace) store text with '▁' for a space and `<0xNN>` byte-fallback pieces.
Added tokens are their literal text. Note for Metaspace tokenizers: the first piece of a text
carries the prepended '▁', so its bytes start with a space the text did not have.

`load_tokenizer(config)` picks the tokenizer a config names; with none named and no checkpoint it
trains the built-in byte-level BPE on the synthetic arithmetic corpus (deterministic, ~1 s).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import re
from typing import Iterable, Sequence

import tokenizers

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # legacy special tokens, see read_tokenizer_config
GENERATION_CONFIG = "generation_config.json"  # eos_token_id: the ids HF generate stops on
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers>=4.47 saves the template here

# ChatML, used by the built-in tokenizer (SmolLM2 and Qwen2 use the same markers).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
BUILTIN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_FALLBACK_EOS = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>")
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens (chat templates see those set)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_name(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _vocab_style(spec: dict) -> str:
    """'byte_level' or 'metaspace' from a tokenizer.json dict; raises for other vocabularies."""
    parts = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")], ensure_ascii=False)
    if '"ByteLevel"' in parts:
        return "byte_level"
    if '"Metaspace"' in parts or "\u2581" in parts or spec.get("model", {}).get("byte_fallback"):
        return "metaspace"
    raise ValueError("unsupported tokenizer vocabulary: rpt_jax needs byte-level BPE or "
                     f"Metaspace/byte-fallback pieces to know each token's bytes; got "
                     f"pre_tokenizer={spec.get('pre_tokenizer')} decoder={spec.get('decoder')}")


def _adds_prefix(node) -> bool:
    """A Prepend normalizer: SentencePiece's '▁' before a text (Llama-2-style tokenizer.json)."""
    return isinstance(node, dict) and node.get("type") == "Prepend"


def read_json(path):
    """A JSON file's value; a missing or malformed file raises an error naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_tokenizer_config(folder) -> dict:
    """A folder's tokenizer_config.json ({} if absent) with special_tokens_map.json merged in as
    transformers merges it: only when the config has no added_tokens_decoder (folders saved
    before transformers 4.34), the map's special tokens then taking precedence."""
    config, special = {}, {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        path = os.path.join(os.fspath(folder), name)
        if os.path.isfile(path):
            (config if name == TOKENIZER_CONFIG else special).update(read_json(path))
    if "added_tokens_decoder" not in config:
        config.update({k: v for k, v in special.items() if k in SPECIAL_TOKEN_KEYS})
    return config


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token and chat-template settings of its folder."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict | None = None,
                 chat_template: str | None = None, source: str = "<memory>",
                 end_ids: tuple[int, ...] = ()):
        self._tok = tok
        self._config = dict(config or {})
        self.source = source
        spec = json.loads(tok.to_str())
        self._style = _vocab_style(spec)
        vocab = tok.get_vocab(with_added_tokens=True)
        # Ids may have holes; size tables by the largest id so every id indexes them.
        self.vocab_size = max(vocab.values()) + 1
        self._added = {a["id"]: a for a in spec.get("added_tokens", [])}

        def lookup(key):
            name = _token_name(self._config.get(key))
            if name is None:
                return None
            i = tok.token_to_id(name)
            if i is None:
                raise ValueError(f"{source}: {key}={name!r} is not in the vocabulary")
            return i

        eos = lookup("eos_token")
        if eos is None:
            eos = next((tok.token_to_id(n) for n in _FALLBACK_EOS if tok.token_to_id(n) is not None),
                       None)
        if eos is None:
            raise ValueError(f"{source}: no eos_token in {TOKENIZER_CONFIG} or "
                             f"{SPECIAL_TOKENS_MAP} and none of {_FALLBACK_EOS} in the vocabulary")
        self.eos_id: int = eos
        bad = [i for i in end_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{source}: {GENERATION_CONFIG} eos_token_id {bad} is outside the "
                             f"vocabulary of {self.vocab_size} ids")
        # where a sample ends: EOS and the checkpoint's other end ids (Llama 3's <|eot_id|>, ...)
        self.end_ids: tuple[int, ...] = tuple(sorted({eos, *end_ids}))
        self.bos_id: int | None = lookup("bos_token")
        pad = lookup("pad_token")
        self.pad_id: int = self.eos_id if pad is None else pad
        ids = {i for i, a in self._added.items() if a.get("special")}
        ids |= {i for i in (*self.end_ids, self.bos_id, self.pad_id) if i is not None}
        ids |= set(range(self.vocab_size)) - set(vocab.values())  # holes never match text
        self.special_ids: frozenset[int] = frozenset(ids)

        if chat_template is None:
            chat_template = self._config.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t["name"]: t["template"] for t in chat_template}
            chat_template = named.get("default", next(iter(named.values()), None))
        self.chat_template: str | None = chat_template

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_file(cls, tokenizer_json, config_json=None) -> "Tokenizer":
        """From a tokenizer.json and optionally its tokenizer_config.json."""
        tokenizer_json = os.fspath(tokenizer_json)
        if not os.path.isfile(tokenizer_json):
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
        config = {} if config_json is None else read_json(os.fspath(config_json))
        return cls(_read_tokenizer(tokenizer_json), config, source=tokenizer_json)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """From a Hugging Face folder: tokenizer.json, tokenizer_config.json (with
        special_tokens_map.json, see `read_tokenizer_config`), chat_template.jinja, and
        generation_config.json's eos_token_id (an id or a list)."""
        path = os.fspath(path)
        tj = os.path.join(path, TOKENIZER_JSON)
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"no {TOKENIZER_JSON} in {path}")
        config = read_tokenizer_config(path)
        template = None
        jinja = os.path.join(path, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja):
            with open(jinja) as f:
                template = f.read()
        end_ids = ()
        gen = os.path.join(path, GENERATION_CONFIG)
        if os.path.isfile(gen):
            eos = read_json(gen).get("eos_token_id")
            end_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return cls(_read_tokenizer(tj), config, template, source=path, end_ids=end_ids)

    def save(self, folder) -> None:
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat template)."""
        os.makedirs(folder, exist_ok=True)
        self._tok.save(os.path.join(folder, TOKENIZER_JSON))
        config = dict(self._config)
        config["eos_token"] = self._tok.id_to_token(self.eos_id)
        config["pad_token"] = self._tok.id_to_token(self.pad_id)
        if self.bos_id is not None:
            config["bos_token"] = self._tok.id_to_token(self.bos_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(folder, TOKENIZER_CONFIG), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        if self.end_ids != (self.eos_id,):
            with open(os.path.join(folder, GENERATION_CONFIG), "w") as f:
                json.dump({"eos_token_id": list(self.end_ids)}, f, indent=2)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`, adding no BOS/EOS.

        With allow_special (the transformers default) a special token's literal text in `text`
        becomes that token; corpus documents use allow_special=False so that text such as
        "<|im_end|>" in a document stays ordinary text.
        """
        return self.encode_batch([text], allow_special)[0]

    def encode_continuation(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text` as it reads after other text (`encode` otherwise): no word-start
        marker is added (SentencePiece vocabularies' Metaspace / Prepend normalizer put a '▁', a
        space, before a text's first word: right at the start of a prompt, not after it)."""
        self._continuing.encode_special_tokens = not allow_special
        try:
            return self._continuing.encode(text, add_special_tokens=False).ids
        finally:
            self._continuing.encode_special_tokens = False

    @functools.cached_property
    def _continuing(self) -> tokenizers.Tokenizer:
        def strip(node):
            if isinstance(node, list):
                return [strip(n) for n in node if not _adds_prefix(n)]
            if isinstance(node, dict):
                node = {k: strip(v) for k, v in node.items()}
                if node.get("type") == "Metaspace":
                    node.update(prepend_scheme="never", add_prefix_space=False)
                if node.get("type") == "ByteLevel":
                    node["add_prefix_space"] = False
            return node

        spec = json.loads(self._tok.to_str())
        spec["normalizer"] = None if _adds_prefix(spec.get("normalizer")) else strip(
            spec.get("normalizer"))
        spec["pre_tokenizer"] = strip(spec.get("pre_tokenizer"))
        return tokenizers.Tokenizer.from_str(json.dumps(spec))

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        """`encode` over many texts (parallel in the Rust library)."""
        self._tok.encode_special_tokens = not allow_special
        try:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        finally:
            self._tok.encode_special_tokens = False

    @functools.cached_property
    def leading_ids(self) -> tuple[int, ...]:
        """The ids transformers' `tokenizer(text)` puts before a text: Llama's BOS, none for
        Qwen2 or SmolLM2. The tokenizer.json post-processor decides, as it does for
        transformers 5's `AutoTokenizer.from_pretrained` (which ignores tokenizer_config.json's
        add_bos_token when tokenizer.json is there)."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        start = next(i for i in range(len(full) + 1) if full[i:i + len(plain)] == plain)
        return tuple(full[:start])

    def decode(self, ids) -> str:
        """Text of ids, special tokens included."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ------------------------------------------------------------------ bytes
    @functools.cached_property
    def _all_token_bytes(self) -> list[bytes]:
        return [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, i: int) -> bytes:
        piece = self._tok.id_to_token(i)
        if piece is None:  # a hole in the id range
            return b""
        if i in self._added:
            return self._added[i]["content"].encode("utf-8")
        if self._style == "byte_level":
            table = _unicode_to_byte()
            try:
                return bytes(table[c] for c in piece)
            except KeyError as e:
                raise ValueError(f"{self.source}: token {i} {piece!r} has a character outside the "
                                 f"byte-level alphabet: {e}") from None
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_bytes(self, i: int) -> bytes:
        """The exact bytes token `i` stands for (an added token: its literal text)."""
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
        return self._all_token_bytes[i]

    @functools.cached_property
    def _byte_table(self):
        from rpt_jax.reward import byte_table_from_tokens  # late: reward imports jax
        special = [i in self.special_ids for i in range(self.vocab_size)]
        return byte_table_from_tokens(self._all_token_bytes, special)

    def byte_table(self):
        """rpt_jax.reward.ByteTable of the whole vocabulary (computed once)."""
        return self._byte_table

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, user_text: str, add_generation_prompt: bool = True) -> str:
        """One user turn through the chat template (rendered as transformers renders it)."""
        if not self.chat_template:
            raise ValueError(f"{self.source}: the tokenizer has no chat_template")
        names = {k: _token_name(self._config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        names["eos_token"] = self._tok.id_to_token(self.eos_id)
        names = {k: v for k, v in names.items() if v is not None}  # unset: undefined, not None
        try:
            return _compile(self.chat_template).render(
                messages=[{"role": "user", "content": user_text}], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **names)
        except Exception as e:  # noqa: BLE001 (jinja2's errors, and what templates raise)
            raise ValueError(f"{self.source}: its chat template fails on one user turn "
                             f"({type(e).__name__}: {e}); set data.chat_template=False or fix "
                             f"the template") from e


def _read_tokenizer(path: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 (the tokenizers library raises bare Exceptions)
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None


# "Today" for chat templates that print the date (Llama 3.x: strftime_now): fixed, so prompts do
# not change from one day to the next (a resumed run equals an uninterrupted one). The date is
# the one Llama 3.1's template falls back to without strftime_now.
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)


@functools.cache
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = TEMPLATE_DATE.strftime
    return env.from_string(template)


def train_bpe(texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = BUILTIN_SPECIAL_TOKENS,
              chat_template: str | None = CHATML_TEMPLATE, eos_token: str | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer of exactly `vocab_size` ids (special tokens first).

    The `tokenizers` trainer is deterministic for a given text order (ties broken by pair), so
    no seed is involved. eos_token defaults to the first special token.
    """
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() < vocab_size:
        # Too little text for all merges: pad with unused added tokens so ids fill the model's
        # embedding table exactly (they never occur in encoded text).
        n = vocab_size - tok.get_vocab_size()
        tok.add_tokens([f"<|unused_{k}|>" for k in range(n)])
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"trained vocabulary has {tok.get_vocab_size()} ids, wanted {vocab_size}")
    eos = eos_token or (special_tokens[0] if special_tokens else None)
    config = {"eos_token": eos, "pad_token": eos}
    return Tokenizer(tok, config, chat_template, source="train_bpe")


def builtin_tokenizer(vocab_size: int) -> Tokenizer:
    """The tiny demo's tokenizer: BPE trained on the synthetic arithmetic corpus and templates."""
    from rpt_jax import contexts, corpora  # late: both import this module
    texts = list(corpora.synthetic_texts())
    # Repeat the prompt templates so their words become tokens and prompts stay short.
    texts += [t.replace("{prompt_content}", "") for t in contexts.TEMPLATES.values()] * 64
    return train_bpe(texts, vocab_size)


def load_tokenizer(config) -> Tokenizer:
    """The tokenizer of a config: data.tokenizer (a folder, or a tokenizer.json, read with the
    files of its folder; a .json of another name alone), else the folder of model.hf_checkpoint,
    else the built-in one sized to model.vocab_size."""
    path = config.data.tokenizer or config.model.hf_checkpoint
    if path and os.path.isfile(path) and os.path.basename(path) == TOKENIZER_JSON:
        path = os.path.dirname(os.path.abspath(path))  # its config: EOS, pad, chat template
    if path:
        tok = Tokenizer.from_file(path) if os.path.isfile(path) else Tokenizer.from_dir(path)
    else:
        tok = builtin_tokenizer(config.model.vocab_size)
    if tok.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer {tok.source} has {tok.vocab_size} ids but "
                         f"model.vocab_size={config.model.vocab_size}")
    return tok
