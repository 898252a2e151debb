"""Hugging Face tokenizer + chat template against transformers' own renders (committed goldens).

tests/fixtures/tokenizer/ is written by scripts/make_tokenizer_fixture.py: a tiny byte-level BPE with
Qwen3's chat template, and `golden.json` rendered and tokenized by transformers (offline). Here nothing
imports transformers: trm_jax renders with jinja2 and tokenizes with `tokenizers`.
"""
import importlib.util
import json
import os
import shutil

import jinja2
import numpy as np
import pytest

from trm_jax.data import tokenizer as tok_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")
GOLDEN = json.load(open(os.path.join(FIXTURE, "golden.json"), encoding="utf-8"))


def _script():
  path = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_tokenizer_fixture.py")
  spec = importlib.util.spec_from_file_location("make_tokenizer_fixture", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def tok():
  return tok_lib.load_tokenizer(FIXTURE)


@pytest.mark.parametrize("i", range(len(GOLDEN["cases"])))
def test_chat_template_and_ids_match_transformers(tok, i):
  case = GOLDEN["cases"][i]
  kwargs = dict(case["kwargs"])
  text = tok.apply_chat_template(case["messages"], **kwargs)
  assert text == case["text"]
  assert tok.encode(text) == case["ids"]
  # transformers' decode default keeps the special tokens; skip_special_tokens=True drops them. Catches a
  # default that drops them (the old behaviour) and a flag that is ignored.
  assert tok.decode(case["ids"]) == case["decoded"]
  assert tok.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]
  ids = np.array([case["ids"]])
  assert tok.decode_batch(ids, np.ones_like(ids)) == [case["decoded"]]
  assert tok.decode_batch(ids, np.ones_like(ids), skip_special_tokens=True) == [case["decoded_skip_special"]]


def test_thinking_switch(tok):
  msgs = [{"role": "user", "content": "Hi"}]
  on = tok.apply_chat_template(msgs)
  off = tok.apply_chat_template(msgs, enable_thinking=False)
  assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  assert off == on + "<think>\n\n</think>\n\n"
  assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_special_ids(tok):
  meta = GOLDEN["meta"]
  assert tok.vocab_size == meta["vocab_size"] == 402
  assert tok.eos_id == meta["eos_token_id"] and tok.pad_id == meta["pad_token_id"]
  end, im_end = tok.encode("<|endoftext|>"), tok.encode("<|im_end|>")
  assert len(end) == len(im_end) == 1
  assert tok.stop_ids == (im_end[0], end[0])  # generation_config's list, in order
  assert tok.bos_id is None and tok.pad_id == end[0]
  assert isinstance(tok, tok_lib.TokenizerLike) and isinstance(tok_lib.Tokenizer(), tok_lib.TokenizerLike)
  assert tok.decode(tok.encode("a <think> b</think>")) == "a <think> b</think>"  # added, not special
  assert tok.decode(im_end + tok.encode("x")) == "<|im_end|>x"  # kept by default, as transformers
  assert tok.decode(im_end + tok.encode("x"), skip_special_tokens=True) == "x"


def test_decode_batch_uses_mask(tok):
  a, b = tok.encode("Answer: 5"), tok.encode("x")
  ids = np.full((2, 12), tok.pad_id, np.int32)
  mask = np.zeros((2, 12), np.int32)
  ids[0, :len(a)], mask[0, :len(a)] = a, 1
  ids[1, :len(b)], mask[1, :len(b)] = b, 1
  ids[1, len(b)] = a[0]  # outside the mask: must not appear
  assert tok.decode_batch(ids, mask) == ["Answer: 5", "x"]


def test_bpe_trained_in_test_renders_like_transformers(tmp_path):
  out = _script().train_tiny_bpe(str(tmp_path / "bpe"))
  tok = tok_lib.load_tokenizer(out)
  for case in GOLDEN["cases"]:  # the rendered text depends on the template and specials, not the merges
    text = tok.apply_chat_template(case["messages"], **case["kwargs"])
    assert text == case["text"]
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
  assert tok.stop_ids == (tok.encode("<|im_end|>")[0], tok.encode("<|endoftext|>")[0])


def test_template_sources_and_errors(tmp_path):
  d = tmp_path / "t"
  shutil.copytree(FIXTURE, d)
  cfg = json.load(open(d / "tokenizer_config.json"))
  # A named-template list: "default" is used.
  cfg["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                          {"name": "tool_use", "template": "T"}]
  json.dump(cfg, open(d / "tokenizer_config.json", "w"))
  msgs = [{"role": "user", "content": "q"}]
  assert tok_lib.load_tokenizer(d).apply_chat_template(msgs) == "Dq"
  assert tok_lib.load_tokenizer(d).apply_chat_template(msgs, tools=[{"name": "f"}]) == "T"  # "tool_use" with tools
  # chat_template.jinja wins over tokenizer_config.json; specials and kwargs reach the template.
  (d / "chat_template.jinja").write_text("{{ eos_token }}|{{ pad_token }}|{{ x }}|{{ {'a': '<é>'} | tojson }}"
                                         "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                                         "{{ m.content }}{% endfor %}")
  t = tok_lib.load_tokenizer(d)
  assert t.apply_chat_template(msgs + msgs, x=3) == '<|im_end|>|<|endoftext|>|3|{"a": "<é>"}q'
  (d / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
  with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
    tok_lib.load_tokenizer(d).apply_chat_template(msgs)
  # generation_config may hold a single int; without it, tokenizer_config's eos is the only stop id.
  json.dump({"eos_token_id": 1}, open(d / "generation_config.json", "w"))
  assert tok_lib.load_tokenizer(d).stop_ids == (1, 2)
  os.remove(d / "generation_config.json")
  assert tok_lib.load_tokenizer(d).stop_ids == (2,)
  # special_tokens_map.json (older checkpoints) fills what tokenizer_config.json does not set.
  json.dump({"eos_token": {"content": "<|im_start|>"}}, open(d / "special_tokens_map.json", "w"))
  assert tok_lib.load_tokenizer(d).stop_ids == (2,)
  cfg.pop("eos_token")
  json.dump(cfg, open(d / "tokenizer_config.json", "w"))
  assert tok_lib.load_tokenizer(d).stop_ids == (1,) and tok_lib.load_tokenizer(d).eos_id == 1
  os.remove(d / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tok_lib.load_tokenizer(d)
  with pytest.raises(ValueError, match="empty conversation"):
    tok_lib.load_tokenizer(FIXTURE).apply_chat_template([])
