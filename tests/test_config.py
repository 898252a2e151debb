"""Config tree: every config file loads and validates; bad values and unknown keys name the field."""
import pytest

from trm_jax import config as config_lib

load = config_lib.load_config


@pytest.mark.parametrize("name,arg", [
    ("default", ""), ("default", "smoke"), ("default", "T=128,seed=3"),
    ("trm", "criterion=max_avg,delta=0.1,delta_avg=0.002"), ("trm", "criterion=avg,divergence_avg=k3,source=sampled"),
    ("trm", "criterion=max,divergence=k2,source=sampled,backend=stale"), ("trm", "criterion=ln,backend=moe"),
    ("trm", "criterion=ser,backend=noise"), ("trm", "criterion=tv,source=topk"),
    ("baselines", "name=ppo_clip"), ("baselines", "name=tis"), ("baselines", "name=none"),
    ("baselines", "name=geo_mask,smoke"),
])
def test_config_files_validate(name, arg):
  config_lib.validate(load(name, arg))


def test_smoke_shrinks():
  c = load("default", "smoke")
  assert c.model.size == "tiny" and c.rl.steps <= 5 and c.data.horizon <= 32


@pytest.mark.parametrize("override,field", [
    ({"trm.criterion": "maxx"}, "trm.criterion"),
    ({"trm.delta": -1.0}, "trm.delta"),
    ({"rl.minibatches": 3}, "rl.minibatches"),
    ({"rl.clip_low": 1.5}, "rl.clip_low"),
    ({"rollout.top_p": 0.0}, "rollout.top_p"),
    ({"trm.source": "sampled", "trm.divergence": "exact"}, "trm.source"),
    ({"rl.dual_clip": 0.5}, "rl.dual_clip"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh"),
    ({"rollout.backend.precision": "fp7"}, "precision"),
])
def test_bad_values_name_the_field(override, field):
  c = config_lib.with_overrides(load("default"), override)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    config_lib.validate(c)


def test_unknown_keys_are_errors():
  c = load("default")
  with pytest.raises(AttributeError):
    c.trm.detla = 0.1  # the tree is locked: a typo cannot add a field
  c.unlock()
  c.trm.detla = 0.1
  with pytest.raises(ValueError, match=r"config\.trm\.detla is not a known field"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match=r"trm\.detla"):
    config_lib.with_overrides(load("default"), {"trm.detla": 1.0})


def test_parse_arg_types_and_errors():
  a = config_lib.parse_arg("smoke,T=64,delta=0.5", smoke=False, T=0, delta=0.1)
  assert a.smoke is True and a.T == 64 and a.delta == 0.5
  with pytest.raises(ValueError, match="'bogus'"):
    config_lib.parse_arg("bogus=1", smoke=False)
  with pytest.raises(ValueError, match="backend must be one of"):
    load("trm", "backend=quantum")
