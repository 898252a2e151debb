"""Tokenizers: characters for the synthetic tasks, Hugging Face files for real LLMs.

`Tokenizer` (fixed character vocabulary) has the specials `pad_id=0, bos_id=1, eos_id=2`.
`load_tokenizer(path)` reads a checkpoint directory's `tokenizer.json` with the `tokenizers` library (no
transformers at run time) and renders its chat template with jinja2 exactly as transformers does; its
`decode` keeps special tokens unless told otherwise, as transformers' does. Both satisfy `TokenizerLike`,
the interface the trainer, sampler and data pipeline use. Neither needs a download.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
from typing import Protocol, Sequence, runtime_checkable

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_NUM_SPECIALS = 3

# Fixed order: ids are part of every stored checkpoint, so append only, never reorder.
_CHARS = "0123456789" + "+-*=,;:|><()[] \n" + "abcdefghijklmnopqrstuvwxyz" + ".#?"


@runtime_checkable
class TokenizerLike(Protocol):
  """What the trainer, sampler and pipeline need from a tokenizer (character or Hugging Face)."""

  pad_id: int  # fills left padding of prompts (masked out, never attended)
  eos_id: int  # the end-of-sequence id appended to supervised targets
  stop_ids: tuple[int, ...]  # any of these ends a sampled response (it is kept in the response mask)
  vocab_size: int  # number of ids the tokenizer can produce (<= the model's vocabulary)

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, with no BOS/EOS added."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (special tokens: the character tokenizer has no text for them; HF keeps them)."""


def load_tokenizer(path) -> HFTokenizer:
  """The Hugging Face tokenizer of the checkpoint directory `path` (see `HFTokenizer`)."""
  return HFTokenizer.from_dir(path)


class Tokenizer:
  """Character-level tokenizer over a fixed synthetic vocabulary (3 specials + 55 chars = 58 ids)."""

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  stop_ids = (EOS_ID,)

  def __init__(self):
    self.chars = _CHARS
    self.vocab_size = _NUM_SPECIALS + len(_CHARS)
    self._id = {c: i + _NUM_SPECIALS for i, c in enumerate(_CHARS)}
    # Byte -> id lookup (-1 = not in vocab) so whole strings encode with one numpy gather.
    self._lut = np.full(256, -1, np.int32)
    for c, i in self._id.items():
      self._lut[ord(c)] = i
    self._chr = np.array([""] * _NUM_SPECIALS + list(_CHARS), dtype=object)

  def encode(self, text: str) -> list[int]:
    """Ids of `text`'s characters (no BOS/EOS added). Raises ValueError naming a bad character."""
    return self.encode_np(text).tolist()

  def encode_np(self, text: str | bytes) -> np.ndarray:
    """Like `encode`, as an int32 numpy array (the pipeline's fast path)."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = self._lut[np.frombuffer(raw, np.uint8)]
    if (ids < 0).any():
      bad = next(c for c in raw.decode("utf-8", "replace") if c not in self._id)
      raise ValueError(f"Tokenizer: character {bad!r} is not in the vocabulary {self.chars!r}")
    return ids

  def decode(self, ids, stop_at_eos: bool = True) -> str:
    """Text of `ids`; specials are dropped, and decoding stops at the first EOS if `stop_at_eos`."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if stop_at_eos and (ids == EOS_ID).any():
      ids = ids[: int(np.argmax(ids == EOS_ID))]
    ids = ids[(ids >= _NUM_SPECIALS) & (ids < self.vocab_size)]
    return "".join(self._chr[ids])


def pad_batch(seqs: list[np.ndarray], length: int, pad_left: bool,
              pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
  """Stacks 1-D id arrays into `[N, length]` (ids, mask), padding with `pad_id` on the chosen side."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    n = len(s)
    if n > length:
      raise ValueError(f"sequence of {n} tokens does not fit length={length}")
    sl = slice(length - n, length) if pad_left else slice(0, n)
    ids[i, sl] = s
    mask[i, sl] = 1
  return ids, mask


# ------------------------------------------------------------------ Hugging Face tokenizer + chat template

# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")
# Names a message's reasoning may come under; transformers fills `reasoning_content` and `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class HFTokenizer:
  """A checkpoint directory's tokenizer: `tokenizers` for ids, jinja2 for the chat template.

  Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, `chat_template`), optionally
  `chat_template.jinja` (preferred over the config's template, as transformers does) and
  `generation_config.json` (`eos_token_id`, an int or a list: every one is a stop id).
  """

  def __init__(self, tokenizer, config: dict, generation_config: dict | None = None,
               chat_template: str | dict | None = None, name: str = ""):
    self.name = name
    self._tok = tokenizer
    self.config = config
    self.special_tokens = {k: _token_text(config.get(k)) for k in _SPECIAL_TOKEN_NAMES
                           if _token_text(config.get(k)) is not None}
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._id_of("bos_token")
    eos = self._id_of("eos_token")
    gen = (generation_config or {}).get("eos_token_id")
    gen = [] if gen is None else [gen] if isinstance(gen, int) else list(gen)
    self.stop_ids = tuple(dict.fromkeys([*gen, *([eos] if eos is not None else [])]))
    if not self.stop_ids:
      raise ValueError(f"tokenizer {name!r}: no eos_token in tokenizer_config.json and no eos_token_id in "
                       "generation_config.json, so sampling could never stop")
    self.eos_id = eos if eos is not None else self.stop_ids[0]
    pad = self._id_of("pad_token")
    self.pad_id = pad if pad is not None else self.eos_id
    self.chat_template = chat_template  # a template, or {name: template} ("default", "tool_use", ...)

  @classmethod
  def from_dir(cls, path) -> HFTokenizer:
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no tokenizer.json in {path!r} (a Hugging Face checkpoint directory is needed)")

    def read(name):
      if not os.path.isfile(os.path.join(path, name)):
        return None
      with open(os.path.join(path, name), encoding="utf-8") as f:
        return json.load(f)

    # Older checkpoints keep the special tokens in special_tokens_map.json; tokenizer_config.json wins.
    config = {**(read("special_tokens_map.json") or {}), **(read("tokenizer_config.json") or {})}
    template = config.get("chat_template")
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    if isinstance(template, list):  # named templates
      template = {t["name"]: t["template"] for t in template}
    return cls(tokenizers.Tokenizer.from_file(file), config, read("generation_config.json"), template,
               name=path)

  def with_stop_tokens(self, tokens) -> HFTokenizer:
    """A copy whose stop ids also include `tokens` (strings, each one token), e.g. "<|im_end|>" for a base
    model whose eos is "<|endoftext|>" but whose chat template ends turns with "<|im_end|>"."""
    ids = []
    for t in tokens:
      i = self._tok.token_to_id(t)
      if i is None:
        raise ValueError(f"stop token {t!r} is not a single token of tokenizer {self.name!r}")
      ids.append(i)
    out = copy.copy(self)
    out.stop_ids = tuple(dict.fromkeys([*self.stop_ids, *ids]))
    return out

  def _id_of(self, key: str) -> int | None:
    text = self.special_tokens.get(key)
    if text is None:
      return None
    i = self._tok.token_to_id(text)
    if i is None:
      raise ValueError(f"tokenizer {self.name!r}: {key} {text!r} of tokenizer_config.json is not in the vocabulary")
    return i

  def encode(self, text: str) -> list[int]:
    """Ids of `text` with no special tokens added (as transformers encodes a rendered chat)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_np(self, text: str | bytes) -> np.ndarray:
    return np.asarray(self.encode(text.decode("utf-8") if isinstance(text, bytes) else text), np.int32)

  def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, batched (the `tokenizers` library runs them in parallel)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special tokens (e.g. `<|im_end|>`) kept unless `skip_special_tokens`, as transformers."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=skip_special_tokens)

  def decode_batch(self, ids, mask, skip_special_tokens: bool = False) -> list[str]:
    """Texts of the rows of `ids` [N, T] restricted to `mask` [N, T] > 0 (specials as in `decode`)."""
    ids, mask = np.asarray(ids), np.asarray(mask) > 0
    return self._tok.decode_batch([[int(i) for i in row[m]] for row, m in zip(ids, mask)],
                                  skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> str:
    """The chat template rendered on `messages`, as `transformers`' `apply_chat_template(tokenize=False)`.

    `template_kwargs` (e.g. `enable_thinking=False`, `tools=[...]`) override the special tokens
    (`bos_token`, `eos_token`, ...) that every template sees.
    """
    template = self.chat_template
    if isinstance(template, dict):  # as transformers: "tool_use" when tools are given, else "default"
      name = "tool_use" if template_kwargs.get("tools") is not None and "tool_use" in template else "default"
      if name not in template:
        raise ValueError(f"tokenizer {self.name!r} has named chat templates {sorted(template)} but no 'default'")
      template = template[name]
    if not template:
      raise ValueError(f"tokenizer {self.name!r} has no chat_template (tokenizer_config.json or chat_template.jinja)")
    if not messages:
      raise ValueError("apply_chat_template: empty conversation")
    tools = _plain(template_kwargs.pop("tools", None))
    documents = _plain(template_kwargs.pop("documents", None))
    kwargs = _plain({**self.special_tokens, **template_kwargs})
    chat = []
    for m in messages:
      if not isinstance(m, dict):
        raise TypeError(f"chat messages must be dicts, got {m!r}")
      m = _plain({k: v for k, v in m.items() if v is not None})
      reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
      if reasoning is not None:
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
      chat.append(m)
    return _compile_template(template).render(
        messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **kwargs)


def _token_text(tok) -> str | None:
  """A tokenizer_config special token: a string or an AddedToken dict {"content": ...}."""
  return tok.get("content") if isinstance(tok, dict) else tok


def _plain(value):
  """Plain JSON data (what transformers lets a template see): numpy scalars/arrays become Python."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return _plain(value.item())
  if isinstance(value, dict):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_plain(v) for v in value)
  for base in (str, int, float):
    if isinstance(value, base):
      return base(value)
  return f"<{type(value).__name__}>"


_TEMPLATES: dict = {}


def _compile_template(source: str):
  """The jinja2 template with transformers' environment: sandboxed, trim_blocks, lstrip_blocks,
  loopcontrols, a `{% generation %}` block, `raise_exception`, `strftime_now` and a `tojson` that
  does not HTML-escape."""
  if source in _TEMPLATES:
    return _TEMPLATES[source]

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  class Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore attributes (as transformers' sandbox does)."""

    def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
      self, args = args[0], args[1:]
      attrs = dict(*args, **kwargs)
      for name in attrs:
        Namespace.check(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      Namespace.check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  env.globals["dict"] = dict
  env.globals["namespace"] = Namespace
  _TEMPLATES[source] = env.from_string(source)
  return _TEMPLATES[source]
