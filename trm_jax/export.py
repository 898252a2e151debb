"""A training run's checkpointed policy -> a Hugging Face model directory (transformers / vLLM load it).

    python -m trm_jax.export export --workdir=RUN --out=DIR [--step=N] [--dtype=bfloat16]
    python -m trm_jax.models.hf export --workdir=RUN --out=DIR      # the same command, its historical name

Only the learner parameters (`state.params`) of one step are restored, on one host; the model's shape comes
from the run's own config, and the HF layout from trm_jax.models.hf.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from trm_jax import checkpoint as ckpt_lib
from trm_jax.models import ModelConfig, model_config_from
from trm_jax.models.hf import HFCheckpointError, abstract_model, model_config_from_hf, param_path, save_pretrained


def _restore_params(ck: ckpt_lib.Checkpointer, step: int) -> tuple[str, dict]:
  """(item directory, {dotted parameter path: array}) of `state.params` at `step`, restored on one device."""
  item = os.path.join(ck.directory, str(step), "state")
  saved = ocp.PyTreeCheckpointer().metadata(item)
  saved = getattr(saved, "item_metadata", saved) or saved
  saved_params = saved["state"]["params"]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # an export holds the params on one host
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), saved_params)
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one), target)
  restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item={"state": {"params": target}}, restore_args={"state": {"params": restore_args}}, partial_restore=True))
  flat = {}
  jax.tree_util.tree_map_with_path(lambda p, x: flat.__setitem__(param_path(p), x), restored["state"]["params"])
  return item, flat


def _run_model_config(mcfg: dict, flat: dict) -> ModelConfig:
  """The run's `ModelConfig`: its `hf_path` checkpoint's config.json, else its size / arch fields."""
  pdt = str(np.dtype(flat["embed"].dtype)) if "embed" in flat else "float32"
  if mcfg.get("hf_path"):
    return model_config_from_hf(mcfg["hf_path"], dtype=pdt, max_len=mcfg.get("max_len") or None)
  return dataclasses.replace(model_config_from(mcfg, int(flat["embed"].shape[0])), param_dtype=pdt)


def export_checkpoint(workdir: str, out_dir: str, *, step: int | None = None, dtype: str | None = "bfloat16",
                      max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes the policy (learner parameters) of a trm_jax run's checkpoint as a Hugging Face directory.

  Restores only `state.params` of step `step` (default: the newest) from `workdir/checkpoints`; the model shape
  comes from the run's config (meta["config"]["model"]: its `hf_path` checkpoint's config.json, whose tokenizer
  and generation files are copied along, else its size / arch fields). Returns `out_dir`.
  """
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step() if step is None else int(step)
  if step is None or step not in ck.all_steps():
    raise HFCheckpointError(f"{ck.directory}: no checkpoint {'at all' if step is None else f'at step {step}'} "
                            f"(steps: {ck.all_steps()})")
  mcfg = (ck.restore_meta(step).get("config") or {}).get("model") or {}
  item, flat = _restore_params(ck, step)
  graphdef, abstract = abstract_model(_run_model_config(mcfg, flat))

  def fill(path, leaf):
    p = param_path(path)
    if p not in flat or tuple(flat[p].shape) != tuple(leaf.shape):
      raise HFCheckpointError(f"{item}: parameter {p} is {'missing' if p not in flat else flat[p].shape}, the run's "
                              f"config implies {leaf.shape}")
    return flat.pop(p)

  params = jax.tree_util.tree_map_with_path(fill, abstract)
  if flat:
    raise HFCheckpointError(f"{item}: parameters {sorted(flat)[:3]} are not in the model the run's config builds")
  save_pretrained(nnx.merge(graphdef, params), out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  copy_from=mcfg.get("hf_path") or None)
  return out_dir


def main(argv=None, prog: str = "python -m trm_jax.export") -> None:
  """The `export` command line: a run's checkpointed policy -> a Hugging Face model directory."""
  p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  e = sub.add_parser("export", help="a run's checkpointed policy -> a Hugging Face model directory")
  e.add_argument("--workdir", required=True, help="the run's --workdir (holds checkpoints/)")
  e.add_argument("--out", required=True, help="output directory (config.json + safetensors + tokenizer files)")
  e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  e.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "keep"),
                 help="storage dtype of the exported weights (keep: the run's parameter dtype)")
  e.add_argument("--max_shard_bytes", type=int, default=5 * 2**30)
  a = p.parse_args(argv)
  out = export_checkpoint(a.workdir, a.out, step=a.step, dtype=None if a.dtype == "keep" else a.dtype,
                          max_shard_bytes=a.max_shard_bytes)
  print(f"[trm_jax] exported {a.workdir} -> {out}")


if __name__ == "__main__":
  main()
