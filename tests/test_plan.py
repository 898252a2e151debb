"""trm_jax.plan: ahead-of-time TPU compilation of the trainer's programs, and sharding at pod scale.

Needs libtpu (`pip install -e ".[tpu]"` installs it); skipped, with the reason, where it cannot be
imported. Nothing runs on a TPU: the programs are compiled for a v5e 2x2 / 4x4 slice on this CPU.
"""
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install \"jax[tpu]\"): "
                                       "trm_jax.plan cannot compile for TPU chips")

from trm_jax import config as config_lib  # noqa: E402
from trm_jax import plan as plan_lib  # noqa: E402
from trm_jax import sharding as sharding_lib  # noqa: E402
from trm_jax.data.tokenizer import Tokenizer  # noqa: E402

# configs/default.py:smoke's model (the "tiny" preset) by hand: D, L, H, K, Dh, F.
D, L, H, K, DH, F = 64, 2, 4, 2, 16, 128


def _tiny_params(vocab):
  per_layer = 2 * D + D * H * DH + 2 * D * K * DH + H * DH * D + 3 * D * F  # 2 norms, q, k+v, o, gate+up+down
  return 2 * vocab * D + D + L * per_layer  # embed + unembed + final norm


def _config(**mesh):
  c = config_lib.load_config("default", "smoke")
  return config_lib.with_overrides(c, {f"mesh.{k}": v for k, v in mesh.items()})


@pytest.fixture(scope="module")
def fsdp_report():
  return plan_lib.plan(_config(data=1, fsdp=4, tensor=1), "v5e:2x2", replicated_threshold=1024)


def test_parse_topology():
  assert plan_lib.parse_topology("v5e:16x16") == ("v5e", (16, 16))
  assert plan_lib.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
  for bad in ("v5e:4x4x4", "v5p:4x4", "v3:2x2", "v6e", "tpu:2x2"):
    with pytest.raises(ValueError, match="topology"):
      plan_lib.parse_topology(bad)


def test_plan_per_chip_bytes_fsdp(fsdp_report):
  r = fsdp_report
  assert r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  n = _tiny_params(Tokenizer().vocab_size)
  assert r["params"] == n
  b = r["bytes_per_chip"]
  assert b["params"] == n * 4 // 4  # float32, every parameter has an `embed` axis: sharded 4 ways
  assert 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 64  # adam mu + nu, plus step counters
  B, P, T = r["batch"]
  assert b["kv_cache"] == 2 * L * B * (P + T) * K * DH * 2 // 4  # bf16 rollout cache (smoke: bf16 backend), batch / 4
  # fwd + bwd (3) + remat (1) + the rollout-numerics recompute (1) over this chip's B/4 rows of P + T tokens.
  vocab = Tokenizer().vocab_size
  want = 5 * B / 4 * (P + T) * (2 * (n - vocab * D) + 4 * L * H * DH * (P + T) / 2)
  assert r["learner"]["flops_analytic"] == pytest.approx(want, rel=1e-9)
  assert r["sampler"]["memory"]["temp"] > 0 and r["learner"]["memory"]["peak"] > 2 * b["params"]
  assert r["verdict"].startswith("fits")
  # Nothing above 1 KiB is whole on every chip: the sampler's [B, T] outputs (the learner's batch) stay
  # batch-sharded (XLA alone returned them replicated).
  assert r["replicated"] == []
  text = plan_lib.format_report(r)
  assert "verdict: fits" in text and "optimizer state" in text


def test_replicated_parameters_are_listed():
  """A data-parallel mesh keeps a full copy of every parameter (and of Adam's mu, nu) on each chip: the tool
  lists them with 4 copies; the batch is sharded over data, so it is not listed."""
  r = plan_lib.plan(_config(data=4, fsdp=1, tensor=1), "v5e:2x2", replicated_threshold=32 * 1024)
  mlp = [row for row in r["replicated"] if row[1] == (L, D, F)]  # w_gate / w_up [L, D, F], 64 KiB each
  assert {row[0].split("[")[0] for row in mlp} == {"params", "opt_state"}
  assert all(row[3] == L * D * F * 4 and row[4] == 4 for row in mlp)
  assert not [row for row in r["replicated"] if row[0].startswith("batch")]


def test_verdict_names_the_largest_consumer():
  gib = plan_lib.GiB
  report = {"hbm_per_chip": 16 * gib, "peak_per_chip": 30 * gib,
            "bytes_per_chip": {"params": 8 * gib, "optimizer": 16 * gib, "stale_snapshots": 0, "kv_cache": gib},
            "learner": {"memory": {"temp": 4 * gib}}}
  v = plan_lib.verdict(report, None)
  assert v.startswith("does not fit") and "reduce parameters + optimizer state" in v and "24.0 GiB" in v
  report["bytes_per_chip"]["kv_cache"] = 40 * gib
  assert "reduce KV cache" in plan_lib.verdict(report, None)
  report["peak_per_chip"] = 10 * gib
  assert plan_lib.verdict(report, None).startswith("fits: peak 10.00 GiB per chip = 62% of HBM")


def test_host_rows_on_a_multi_host_slice():
  """v5e 4x4 = 4 hosts of 2x2 chips: every batch row is read by exactly one host, and each host's rows
  are those of its own chips in the mesh (here NOT a contiguous block: the mesh follows the torus)."""
  devices = plan_lib.topology_devices("v5e:4x4")
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  B = 32
  per_device = B // 16
  hosts = sorted({d.process_index for d in devices})
  assert len(hosts) == 4
  seen = []
  for h in hosts:
    rows = sharding_lib.host_rows(mesh, B, process_index=h)
    want = sorted(r for i, d in enumerate(mesh.devices.reshape(-1)) if d.process_index == h
                  for r in range(i * per_device, (i + 1) * per_device))
    np.testing.assert_array_equal(rows, want)
    seen.extend(rows)
  assert sorted(seen) == list(range(B))
  # jax.make_mesh orders a 1-D axis as a ring over the 4x4 torus, so some host's chips are not
  # consecutive: a "block process_index of process_count" pipeline would feed them the wrong rows.
  contiguous = [np.all(np.diff(sharding_lib.host_rows(mesh, B, process_index=h)) == 1) for h in hosts]
  assert not all(contiguous)
