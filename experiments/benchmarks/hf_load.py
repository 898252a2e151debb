"""Sharded Hugging Face loading benchmark: bytes read and memory per process vs checkpoint size.

    python -m experiments.benchmarks.hf_load [--processes 4] [--full] [--json F]

`bench_hf_load`: writes a random Qwen3-shaped checkpoint (trm_jax.models.hf.save_pretrained, bf16, sharded
files), then loads it in N jax processes (CPU, `devices_per_process` fake devices each, one global
fsdp x tensor mesh) with `load_pretrained(mesh=...)`. Each process reports the checkpoint bytes it read
(safetensors slice reads) and its peak RSS growth during the load. JSON keys:
  hf_load_bytes_read_frac   max over processes of bytes read / checkpoint bytes (1/fsdp-ish is the goal;
                            1.0 would mean every host reads everything)
  hf_load_anon_growth_frac  max over processes of the peak growth of resident ANONYMOUS memory during the load
                            / checkpoint bytes (its own shards as f32 device buffers + transient slices)
  hf_load_file_pages_frac   same for resident file-backed pages (safetensors is memory-mapped: a column slice
                            of a row-major tensor touches every page holding one of its rows; evictable cache)
  hf_load_local_param_frac  this process's parameter shards (f32) / checkpoint bytes (bf16): the floor
  hf_load_checkpoint_mb, hf_load_processes, hf_load_mesh, hf_load_seconds (details)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from experiments import common

# A Qwen3-like shape big enough that per-host reads dominate the runtime's own memory, small enough for CPU.
LOAD_DIMS = dict(vocab_size=32768, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536,
                 max_len=4096, rope_theta=1e6, qk_norm=True, tie_embeddings=False)  # 56M params, 112 MB bf16
LOAD_DIMS_FULL = dict(LOAD_DIMS, vocab_size=65536, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=8,
                      d_ff=3072)  # 280M params, 560 MB bf16


def write_random_checkpoint(out_dir: str, dims=None, seed: int = 0) -> int:
  """A random Qwen3-shaped HF checkpoint (bf16, several safetensors shards); returns its tensor bytes."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from trm_jax.models import ModelConfig, Transformer  # noqa: PLC0415
  from trm_jax.models import hf  # noqa: PLC0415
  cfg = ModelConfig(**(dims or LOAD_DIMS))
  with jax.default_device(jax.devices("cpu")[0]), nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
  files = hf.save_pretrained(model, out_dir, dtype="bfloat16", max_shard_bytes=16 * 2**20)
  return sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)


def _rss_kinds() -> dict:
  """Resident anonymous (heap, buffers) and file-backed (mmapped safetensors pages) bytes of this process."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("RssAnon:", "RssFile:")):
        out[line.split(":")[0]] = int(line.split()[1]) * 1024
  return out


def _load_worker(args) -> None:
  """One process of the multi-process load: prints one JSON line."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: PLC0415
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.processes,
                             process_id=args.rank)
  from trm_jax import sharding as sharding_lib  # noqa: PLC0415
  from trm_jax.models import hf  # noqa: PLC0415
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": args.fsdp, "tensor": -1})
  from flax import nnx  # noqa: PLC0415
  kinds0, t0 = _rss_kinds(), time.perf_counter()
  peak, done = dict(kinds0), threading.Event()

  def poll():  # ru_maxrss is the peak since process start (imports, init): sample during the load instead
    while not done.is_set():
      for k, v in _rss_kinds().items():
        peak[k] = max(peak[k], v)
      time.sleep(0.002)

  poller = threading.Thread(target=poll, daemon=True)
  poller.start()
  model, stats = hf.load_pretrained(args.ckpt, mesh=mesh, return_stats=True)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - t0
  done.set()
  poller.join()
  local = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
  kinds1 = _rss_kinds()
  result = dict(rank=args.rank, bytes_read=stats["bytes_read"], checkpoint_bytes=stats["checkpoint_bytes"],
                peak_anon_growth=peak["RssAnon"] - kinds0["RssAnon"],
                peak_file_growth=peak["RssFile"] - kinds0["RssFile"],
                local_param_bytes=local, seconds=seconds, anon_growth=kinds1["RssAnon"] - kinds0["RssAnon"],
                file_growth=kinds1["RssFile"] - kinds0["RssFile"], mesh=dict(mesh.shape))
  print("RESULT " + json.dumps(result), flush=True)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def bench_hf_load(processes: int = 4, devices_per_process: int = 2, dims=None, timeout: int = 600) -> dict:
  """Loads one random checkpoint in `processes` jax processes; see the module docstring for the keys."""
  n_dev = processes * devices_per_process
  fsdp = processes  # fsdp spans the processes, tensor stays inside each: every host owns 1/processes of "embed"
  with tempfile.TemporaryDirectory() as d:
    ckpt = os.path.join(d, "ckpt")
    ckpt_bytes = write_random_checkpoint(ckpt, dims)
    port = _free_port()
    cmd = lambda r: [sys.executable, "-m", "experiments.benchmarks.hf_load", "--hf_load_worker", f"--rank={r}",
                     f"--processes={processes}", f"--devices_per_process={devices_per_process}",
                     f"--fsdp={fsdp}", f"--port={port}", f"--ckpt={ckpt}"]
    procs = [subprocess.Popen(cmd(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.REPO)
             for r in range(processes)]
    outs = [p.communicate(timeout=timeout) for p in procs]
  results = []
  for p, (out, err) in zip(procs, outs):
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
      raise RuntimeError(f"hf load worker failed (rc={p.returncode}):\n{err[-3000:]}")
    results.append(json.loads(lines[-1][len("RESULT "):]))
  total = results[0]["checkpoint_bytes"]
  return {
      "hf_load_bytes_read_frac": max(r["bytes_read"] for r in results) / total,
      "hf_load_anon_growth_frac": max(r["peak_anon_growth"] for r in results) / total,
      "hf_load_file_pages_frac": max(r["peak_file_growth"] for r in results) / total,
      "hf_load_local_param_frac": max(r["local_param_bytes"] for r in results) / total,
      "hf_load_checkpoint_mb": total / 2**20,
      "hf_load_file_mb": ckpt_bytes / 2**20,
      "hf_load_processes": processes,
      "hf_load_mesh": results[0]["mesh"],
      "hf_load_devices": n_dev,
      "hf_load_seconds": max(r["seconds"] for r in results),
      "hf_load_per_process": results,
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--full", action="store_true", help="the larger checkpoint (LOAD_DIMS_FULL)")
  p.add_argument("--json", default="")
  p.add_argument("--hf_load_worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--rank", type=int, default=0)
  p.add_argument("--processes", type=int, default=4)
  p.add_argument("--devices_per_process", type=int, default=2)
  p.add_argument("--fsdp", type=int, default=4)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--ckpt", default="")
  a = p.parse_args(argv)
  if a.hf_load_worker:
    _load_worker(a)
    return
  res = bench_hf_load(a.processes, a.devices_per_process, LOAD_DIMS_FULL if a.full else None)
  print(json.dumps({k: v for k, v in res.items() if k != "hf_load_per_process"}, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
