"""TFDS builders and the grain pipeline: local builds, shapes, padding, determinism, shards, state."""
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from trm_jax.data import builders, pipeline, tasks
from trm_jax.data.tokenizer import BOS_ID, EOS_ID, Tokenizer

TOK = Tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _cfg(data_dir, task="addition", horizon=64, **kw):
  c = pipeline.default_data_config()
  c.update(dict(task=task, horizon=horizon, data_dir=data_dir, num_train=96, num_eval=24, **kw))
  return c


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_builder_builds_locally_in_seconds(name, data_dir):
  t0 = time.time()
  b = builders.build(name, 128, data_dir, num_train=64, num_eval=16)
  assert time.time() - t0 < 20
  assert {s: b.info.splits[s].num_examples for s in builders.SPLITS} == {
      "train": 64, "validation": 16, "test": 16}
  assert str(b.version) == "1.0.0" and b.info.file_format.value == "array_record"
  src = tfds.data_source("trm_tasks", split="validation", data_dir=data_dir, download=False,
                         builder_kwargs={"config": b.builder_config})
  ex = src[3]
  assert ex["solution"].decode().endswith("=" + ex["answer"].decode())
  # Splits use different seeds; rebuilding reuses the files (same data, no regeneration).
  train = builders.build(name, 128, data_dir, num_train=64, num_eval=16).as_data_source("train")
  assert train[3]["prompt"] != ex["prompt"]
  assert builders.build(name, 128, data_dir, num_train=64, num_eval=16).as_data_source(
      "validation")[3] == ex


def test_builder_configs_and_growing_train_extends():
  names = {c.name for c in builders.TrmTasks.BUILDER_CONFIGS}
  assert {"running_sum_h64", "copy_reverse_h4096", "addition_h32", "sort_h1024"} <= names
  assert builders.task_config("sort", 64, num_train=10, num_eval=5).name == "sort_h64_tr10_ev5"
  with pytest.raises(ValueError, match="horizon=8"):
    builders.task_config("sort", 8)


def test_train_prefix_stable_when_num_train_grows(data_dir):
  small = builders.build("sort", 40, data_dir, num_train=8, num_eval=4).as_data_source("train")
  big = builders.build("sort", 40, data_dir, num_train=16, num_eval=4).as_data_source("train")
  assert {small[i]["prompt"] for i in range(8)} <= {big[i]["prompt"] for i in range(16)}


def test_batches_shapes_dtypes_and_padding(data_dir):
  c = _cfg(data_dir)
  task = pipeline.task_from_config(c)
  b = next(pipeline.make_iterator(c, "train", batch_size=8, seed=0))
  want = {"prompt": task.prompt_len, "prompt_mask": task.prompt_len, "answer": task.answer_len,
          "answer_mask": task.answer_len, "target": 64, "target_mask": 64}
  assert {k: v.shape for k, v in b.items()} == {k: (8, n) for k, n in want.items()}
  assert all(v.dtype == np.int32 for v in b.values())
  for i in range(8):
    pm, tm = b["prompt_mask"][i], b["target_mask"][i]
    n, m = int(pm.sum()), int(tm.sum())
    assert pm[-n:].all() and not pm[:-n].any()                  # left padded
    assert b["prompt"][i, -n] == BOS_ID and (b["prompt"][i, :-n] == 0).all()
    assert tm[:m].all() and not tm[m:].any()                     # right padded
    assert b["target"][i, m - 1] == EOS_ID and (b["target"][i, :m - 1] != EOS_ID).all()
    prompt = TOK.decode(b["prompt"][i])
    a, bb = prompt[len("add:"):].split("+")
    assert TOK.decode(b["answer"][i]) == str(int(a) + int(bb))
  r = task.reward(b["target"], b["target_mask"], b["answer"], b["answer_mask"])
  np.testing.assert_array_equal(r, 1.0)
  # stats() counts what the split really holds (the config's sizes, as built).
  for split in builders.SPLITS:
    assert task.stats(split) == {"prompts": float(len(pipeline.data_source(c, split))), "prompts_dropped_long": 0}
  assert task.stats("train")["prompts"] == 96 and task.stats("test")["prompts"] == 24


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(xs, ys):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(xs, ys) for k in x)


def test_deterministic_given_seed(data_dir):
  c = _cfg(data_dir)
  a = _take(pipeline.make_iterator(c, "train", batch_size=8, seed=3), 15)  # crosses epochs
  b = _take(pipeline.make_iterator(c, "train", batch_size=8, seed=3), 15)
  d = _take(pipeline.make_iterator(c, "train", batch_size=8, seed=4), 15)
  assert _same(a, b) and not _same(a, d)
  # Epochs are reshuffled: the second epoch is a permutation of the first, in another order.
  ep1 = np.concatenate([x["prompt"] for x in a[:12]])
  ep2 = np.concatenate([x["prompt"] for x in _take(pipeline.make_iterator(
      c, "train", batch_size=8, seed=3), 24)[12:]])
  assert not np.array_equal(ep1, ep2)
  assert sorted(map(bytes, ep1)) == sorted(map(bytes, ep2))


def test_no_shuffle_finite_epochs(data_dir):
  c = _cfg(data_dir)
  batches = list(pipeline.make_iterator(c, "test", batch_size=10, seed=0, shuffle=False,
                                        num_epochs=1))
  assert len(batches) == 2  # 24 examples, remainder dropped
  src = pipeline.data_source(c, "test")
  assert TOK.decode(batches[0]["prompt"][0]) == src[0]["prompt"].decode()


def test_host_shards_are_disjoint(data_dir):
  c = _cfg(data_dir)
  shards = []
  for index in range(3):
    it = pipeline.make_iterator(c, "train", batch_size=12, seed=0, num_epochs=1,
                                process_index=index, process_count=3)
    shards.append({bytes(p) for b in it for p in b["prompt"]})
  assert all(len(s) == 32 for s in shards)
  assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])


def test_state_restore_is_exact(data_dir):
  c = _cfg(data_dir)
  it = pipeline.make_iterator(c, "train", batch_size=8, seed=0)
  _take(it, 5)
  state = it.get_state()
  want = _take(it, 10)  # crosses an epoch boundary
  fresh = pipeline.make_iterator(c, "train", batch_size=8, seed=0)
  fresh.set_state(state)
  assert _same(want, _take(fresh, 10))
  other = pipeline.make_iterator(c, "train", batch_size=8, seed=0)
  assert not _same(want[:2], _take(other, 2))  # (so the check above can fail)


def test_warmstart_noise(data_dir):
  c = _cfg(data_dir, task="sort")
  task = pipeline.task_from_config(c)
  reward = lambda b: np.asarray(task.reward(b["target"], b["target_mask"], b["answer"],
                                            b["answer_mask"]))
  c.warmstart_noise = 0.0
  clean = next(pipeline.warmstart_iterator(c, batch_size=32, seed=0))
  np.testing.assert_array_equal(reward(clean), 1.0)
  c.warmstart_noise = 1.0
  noisy = next(pipeline.warmstart_iterator(c, batch_size=32, seed=0))
  assert (reward(noisy) < 0.5).all()
  np.testing.assert_array_equal(noisy["answer"], clean["answer"])  # the reference is untouched
  np.testing.assert_array_equal(noisy["target_mask"], clean["target_mask"])
  c.warmstart_noise = 0.25
  frac = np.mean([reward(b) < 1 for b in _take(pipeline.warmstart_iterator(c, batch_size=32,
                                                                            seed=1), 8)])
  assert 0.1 < frac < 0.4


def test_default_config_and_errors(data_dir):
  c = pipeline.default_data_config()
  assert (c.task, c.horizon, c.warmstart_noise, c.data_dir) == ("running_sum", 64, 0.0, "")
  for field in ("num_train", "num_eval", "math_manual_dir", "size", "min_size"):
    assert field in c
  assert (c.text.tokenizer_path, c.text.prompt_len, c.text.reward, c.text.overlong_buffer) == ("", 2048, "dapo", 0)
  with pytest.raises(ValueError, match="must be a probability"):
    pipeline.make_iterator(_cfg(data_dir), "train", batch_size=8, seed=0, noise=1.5)
  with pytest.raises(ValueError, match="batch_size=100"):
    pipeline.make_iterator(_cfg(data_dir), "test", batch_size=100, seed=0)


_CONCURRENT_BUILD = """
import os, sys, time
from trm_jax.data import pipeline
c = pipeline.default_data_config()
c.update(dict(task="addition", horizon=64, data_dir=sys.argv[1], num_train=400, num_eval=100))
open(sys.argv[2], "w").close()  # ready
while not os.path.exists(sys.argv[3]):
  time.sleep(0.01)
print(len(pipeline.data_source(c, "train")))
"""


def test_processes_started_together_build_one_dataset(tmp_path):
  """Two processes opening the same missing dataset at once: both get it (TFDS alone fails the second's
  rename of its finished build into place: FileExistsError)."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  go = tmp_path / "go"
  procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_BUILD, str(tmp_path / "tfds"),
                             str(tmp_path / f"ready{i}"), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  deadline = time.time() + 120
  while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
    time.sleep(0.05)
  go.touch()
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.split()[-1] == "400"
