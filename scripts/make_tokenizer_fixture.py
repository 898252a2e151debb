"""Writes tests/fixtures/tokenizer/: a tiny BPE tokenizer with the Qwen3 chat template, and golden renders.

  python scripts/make_tokenizer_fixture.py [--out tests/fixtures/tokenizer]

`train_tiny_bpe(out_dir)` (no transformers needed; tests call it too) trains a deterministic byte-level
BPE with the `tokenizers` library on a small fixed corpus and writes `tokenizer.json`,
`tokenizer_config.json` (Qwen3's special tokens and its chat template, thinking switch included) and
`generation_config.json` (eos ids as a list, as Qwen3 ships them). `main()` then renders CONVERSATIONS
with transformers (offline, from those files) into `golden.json`: the chat-templated text and its ids,
and its decoding with transformers' default (special tokens kept) and with skip_special_tokens=True,
which tests/test_tokenizer.py compares against trm_jax's own jinja2 rendering without transformers.
"""
from __future__ import annotations

import argparse
import json
import os

# Qwen3's chat template (Qwen/Qwen3-8B tokenizer_config.json), verbatim.
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Qwen3's specials: <|endoftext|> pads and ends base-model text, <|im_end|> ends a chat turn;
# <think> / </think> are added tokens that are NOT special (they survive skip_special_tokens).
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED = ("<think>", "</think>")

DAPO_USER = ("Solve the following math problem step by step. The last line of your response should be of the "
             "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
             "Let $x$ satisfy $x^2 = \\frac{1}{4}$ and $x \u2265 0$. Find $x$.\n\n"
             "Remember to put your answer on its own line after \"Answer:\"")

CORPUS = [
    "Solve the following math problem step by step.",
    "The last line of your response should be of the form Answer: $Answer (without quotes).",
    "Let $x$ be a real number such that $x^2 + 2x + 1 = 0$. Find $x$.",
    "We compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}, so the answer is \\boxed{5}.",
    "The sum of the first 100 positive integers is 5050. Therefore Answer: 5050",
    "Find the number of ordered pairs (a, b) of integers with 0 <= a, b <= 9.",
    "In triangle ABC, AB = 13, BC = 14 and CA = 15. Compute the area of the triangle.",
    "Remember to put your answer on its own line after \"Answer:\"",
    "You are a helpful assistant. Think step by step before answering.",
    "The probability is m/n where m and n are relatively prime positive integers. Find m + n.",
] * 3


def train_tiny_bpe(out_dir: str, vocab_size: int = 400) -> str:
  """Trains the fixture's byte-level BPE and writes tokenizer.json + configs to `out_dir`; returns it."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=list(SPECIAL),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer=trainer)
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in ADDED])
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "model_max_length": 131072,
      "clean_up_tokenization_spaces": False,
      "chat_template": QWEN3_CHAT_TEMPLATE,
  }
  ids = {t: tok.token_to_id(t) for t in SPECIAL}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
               "pad_token_id": ids["<|endoftext|>"]}, f, indent=2)
  return out_dir


# (messages, template kwargs); add_generation_prompt is one of the kwargs.
CONVERSATIONS = [
    ([{"role": "user", "content": DAPO_USER}], {"add_generation_prompt": True}),
    ([{"role": "user", "content": DAPO_USER}], {"add_generation_prompt": True, "enable_thinking": False}),
    ([{"role": "user", "content": DAPO_USER}], {"add_generation_prompt": True, "enable_thinking": True}),
    ([{"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "What is 1+1?"}], {"add_generation_prompt": True, "enable_thinking": False}),
    ([{"role": "user", "content": "What is 1+1?"},
      {"role": "assistant", "content": "<think>\nOne plus one.\n</think>\n\nAnswer: 2"}],
     {"add_generation_prompt": False}),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What is 1+1?"},
      {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nAnswer: 2"},
      {"role": "user", "content": "And 2+2?"}], {"add_generation_prompt": True}),
    ([{"role": "user", "content": "What is 2+3?"},
      {"role": "assistant", "content": "Answer: 5", "reasoning_content": "Two plus three is five."}],
     {"add_generation_prompt": False}),
    ([{"role": "user", "content": "Compute 3 < 4 & 5?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "calc", "arguments": {"expr": "3 < 4 & 5", "note": "\u00e9"}}}]},
      {"role": "tool", "content": "true"}],
     {"add_generation_prompt": True, "tools": [
         {"type": "function", "function": {"name": "calc", "description": "Evaluates <expr>.",
                                           "parameters": {"type": "object", "properties": {
                                               "expr": {"type": "string"}}}}}]}),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                    "tokenizer"))
  out = train_tiny_bpe(os.path.normpath(parser.parse_args().out))
  os.environ["HF_HUB_OFFLINE"] = "1"
  import transformers  # pylint: disable=g-import-not-at-top  # fixture generation only

  hf = transformers.AutoTokenizer.from_pretrained(out)
  golden = []
  for messages, kwargs in CONVERSATIONS:
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    # decode both ways: transformers' default keeps special tokens; skip_special_tokens=True drops them.
    golden.append({"messages": messages, "kwargs": kwargs, "text": text, "ids": list(ids),
                   "decoded": hf.decode(ids), "decoded_skip_special": hf.decode(ids, skip_special_tokens=True)})
  meta = {"transformers": transformers.__version__, "eos_token_id": hf.eos_token_id,
          "pad_token_id": hf.pad_token_id, "vocab_size": len(hf)}
  with open(os.path.join(out, "golden.json"), "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "cases": golden}, f, indent=1, ensure_ascii=False)
  print(f"wrote {out}: {len(golden)} golden chats, vocab {len(hf)}")


if __name__ == "__main__":
  main()
