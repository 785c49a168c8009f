"""Tokenizers: text <-> token ids for a checkpoint folder, with its chat template.

Two back ends, found in this order by ``load_tokenizer(path)``:

- ``tokenizer.json`` (the Hugging Face "fast" format, read by the ``tokenizers`` library), with special tokens and
  the chat template from ``tokenizer_config.json`` (or ``chat_template.jinja``);
- the byte tokenizer that a checkpoint's ``config.json`` describes under ``"tokenizer": {"type": "bytes", ...}``
  (our small trained models: token id = UTF-8 byte value, plus <bos>/<eos>/<pad>).

Every tokenizer has ``encode``, ``decode``, ``bos_token_id``, ``eos_token_id``, ``eos_token_ids``, ``vocab_size``
and ``apply_chat_template``. Chat templates are rendered with jinja2 the way transformers renders them (sandboxed,
``trim_blocks``/``lstrip_blocks``, ``tojson``, ``raise_exception``, ``strftime_now``).
"""
from __future__ import annotations

import json
import os

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """What every back end provides; subclasses set the attributes and implement ``encode``/``decode``."""

    path: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: list[int] = []
    pad_token_id: int | None = None
    vocab_size: int = 0
    chat_template: str | None = None
    special_tokens: dict[str, str] = {}  # bos_token, eos_token, ... as text, for chat templates

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        """The prompt text for a chat (``[{"role": "user", "content": "..."}, ...]``), as the model was trained
        to see it. Extra keywords (``tools``, ``enable_thinking``, ...) go to the template."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer of {self.path or 'this model'} has no chat template (no "
                             f"'chat_template' in tokenizer_config.json and no chat_template.jinja): "
                             "pass a plain text prompt instead")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"messages must be a list of dicts with 'role' and 'content', got {messages!r:.200}")
        from jinja2 import TemplateError

        values = {"tools": None, "documents": None, **self.special_tokens, **template_kwargs}
        try:
            return _compile(self.chat_template).render(messages=list(messages),
                                                       add_generation_prompt=add_generation_prompt, **values)
        except TemplateError as e:
            raise ValueError(f"the chat template of {self.path or 'this model'} failed: {e}") from e


class ByteTokenizer(Tokenizer):
    """256 byte tokens plus a few specials. Described in a checkpoint's config.json under ``"tokenizer"``."""

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 260  # one spare id; multiple of 4

    def __init__(self, bos: int = BOS, eos: int = EOS, pad: int = PAD, vocab_size: int = 260,
                 path: str | None = None):
        if not (vocab_size >= 256 and all(256 <= t < vocab_size for t in (bos, eos, pad))):
            raise ValueError(f"byte tokenizer of {path or '?'}: special ids bos={bos}, eos={eos}, pad={pad} must "
                             f"lie in [256, vocab_size={vocab_size})")
        self.BOS, self.EOS, self.PAD, self.vocab_size, self.path = bos, eos, pad, vocab_size, path
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad
        self.eos_token_ids = [eos]
        self._names = {bos: "<bos>", eos: "<eos>", pad: "<pad>"}

    def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes; with ``add_special_tokens`` a leading <bos> (how the model saw the start of a file)."""
        b = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return ([self.BOS] if add_special_tokens else []) + list(b)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if skip_special_tokens:
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self._names.get(i, f"<{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    @classmethod
    def description(cls) -> dict:
        return {"type": "bytes", "byte_ids": [0, 255], "bos_token_id": cls.BOS, "eos_token_id": cls.EOS,
                "pad_token_id": cls.PAD, "vocab_size": cls.vocab_size,
                "note": "token id = UTF-8 byte value; files are wrapped as <bos> bytes <eos>"}

    @classmethod
    def from_description(cls, d: dict, path: str | None = None) -> "ByteTokenizer":
        try:
            return cls(int(d.get("bos_token_id", cls.BOS)), int(d.get("eos_token_id", cls.EOS)),
                       int(d.get("pad_token_id", cls.PAD)), int(d.get("vocab_size", 260)), path=path)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path or 'config.json'}: bad byte-tokenizer description {d!r}: {e}") from e


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` read by the ``tokenizers`` library, plus ``tokenizer_config.json``'s special tokens
    and chat template."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # a core dependency; only a broken install gets here
            raise ImportError("reading tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from e
        file = os.path.join(path, TOKENIZER_FILE)
        try:
            self._tok = _Tok.from_file(file)
        except Exception as e:  # the Rust side raises a plain Exception for unreadable JSON or unknown models
            raise ValueError(f"{file}: cannot be read as a tokenizers tokenizer.json ({e})") from e
        self.path = path
        tc = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        names = {**_special_names(_read_json(os.path.join(path, "special_tokens_map.json")) or {}),
                 **_special_names(tc)}
        self.special_tokens = names
        self.bos_token_id = self._id_of(names.get("bos_token"))
        self.eos_token_id = self._id_of(names.get("eos_token"))
        self.pad_token_id = self._id_of(names.get("pad_token"))
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        gen = _read_json(os.path.join(path, "generation_config.json")) or {}
        g = gen.get("eos_token_id")
        for t in (g if isinstance(g, list) else [] if g is None else [g]):
            if isinstance(t, int) and t not in eos:
                eos.append(t)
        self.eos_token_ids = eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = _chat_template(path, tc)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def find_tokenizer(path: str | None) -> Tokenizer | None:
    """The tokenizer of a checkpoint folder, or None when it has none (presets, weights-only folders)."""
    if path is None or not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        return HFTokenizer(path)
    desc = (_read_json(os.path.join(path, "config.json")) or {}).get("tokenizer")
    if isinstance(desc, dict):
        if desc.get("type") == "bytes":
            return ByteTokenizer.from_description(desc, path=path)
        raise ValueError(f"{os.path.join(path, 'config.json')}: unknown tokenizer type {desc.get('type')!r} "
                         "(known: 'bytes')")
    others = [f for f in ("tokenizer.model", "tokenizer_config.json", "vocab.json")
              if os.path.isfile(os.path.join(path, f))]
    if others:
        raise ValueError(f"{path} has {', '.join(others)} but no {TOKENIZER_FILE}; only the tokenizer.json format "
                         "is read. Convert once with transformers: "
                         f"AutoTokenizer.from_pretrained({path!r}).save_pretrained({path!r})")
    return None


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a checkpoint folder; a clear error when it has none."""
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer path {path!r} is not a folder")
    tok = find_tokenizer(path)
    if tok is None:
        raise ValueError(f"{path} has no tokenizer: expected {TOKENIZER_FILE} or a \"tokenizer\" entry in "
                         "config.json")
    return tok


def _read_json(file: str) -> dict | None:
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def _special_names(cfg: dict) -> dict[str, str]:
    """bos_token, eos_token, ... as strings (tokenizer_config.json stores a string or an AddedToken dict)."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def _chat_template(path: str, tc: dict) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    t = tc.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


_COMPILED: dict[str, object] = {}


def _compile(template: str):
    if template not in _COMPILED:
        from datetime import datetime

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            from jinja2 import TemplateError

            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _COMPILED[template] = env.from_string(template)
    return _COMPILED[template]
