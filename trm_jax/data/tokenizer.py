"""Tokenizers: a fixed character-level vocabulary for the synthetic tasks, bytes for real math text.

Both share the specials `pad_id=0, bos_id=1, eos_id=2`, so the sampler and the masks never need to
know which one produced the ids. Neither needs a download.
"""
from __future__ import annotations

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_NUM_SPECIALS = 3

# Fixed order: ids are part of every stored checkpoint, so append only, never reorder.
_CHARS = "0123456789" + "+-*=,;:|><()[] \n" + "abcdefghijklmnopqrstuvwxyz" + ".#?"


class Tokenizer:
  """Character-level tokenizer over a fixed synthetic vocabulary (3 specials + 55 chars = 58 ids)."""

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

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

  def encode_batch(self, texts, length: int, pad_left: bool = False, *, bos: bool = False,
                   eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and pads `texts` to `[N, length]` int32 ids and an int32 mask (1 on real tokens).

    `bos`/`eos` add the specials around each text. Raises ValueError if a text does not fit.
    """
    return _pad_batch([self._with_specials(self.encode_np(t), bos, eos) for t in texts],
                      length, pad_left)

  @staticmethod
  def _with_specials(ids: np.ndarray, bos: bool, eos: bool) -> np.ndarray:
    parts = ([np.array([BOS_ID], np.int32)] if bos else []) + [ids.astype(np.int32)]
    return np.concatenate(parts + ([np.array([EOS_ID], np.int32)] if eos else []))


class MathTokenizer(Tokenizer):
  """Byte-level tokenizer for real math text: id = byte + 3 (vocab 259); UTF-8 round-trips exactly."""

  def __init__(self):  # pylint: disable=super-init-not-called
    self.chars = None
    self.vocab_size = 256 + _NUM_SPECIALS

  def encode_np(self, text: str | bytes) -> np.ndarray:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype(np.int32) + _NUM_SPECIALS

  def decode(self, ids, stop_at_eos: bool = True) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    if stop_at_eos and (ids == EOS_ID).any():
      ids = ids[: int(np.argmax(ids == EOS_ID))]
    ids = ids[(ids >= _NUM_SPECIALS) & (ids < self.vocab_size)] - _NUM_SPECIALS
    # A truncated response can end inside a multi-byte character; keep what decodes.
    return ids.astype(np.uint8).tobytes().decode("utf-8", "replace")


def _pad_batch(seqs: list[np.ndarray], length: int, pad_left: bool) -> tuple[np.ndarray, np.ndarray]:
  """Stacks 1-D id arrays into `[N, length]` (ids, mask), padding with PAD_ID on the chosen side."""
  ids = np.full((len(seqs), length), PAD_ID, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    n = len(s)
    if n > length:
      raise ValueError(f"sequence of {n} tokens does not fit length={length}")
    sl = slice(length - n, length) if pad_left else slice(0, n)
    ids[i, sl] = s
    mask[i, sl] = 1
  return ids, mask
