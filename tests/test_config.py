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


@pytest.mark.parametrize("key,closest", [
    ("trm.detla", "trm.delta"),  # a typo
    ("data.group_size", "rl.group_size"),  # the right name in the wrong section
    ("optim.learning_rate", None),
])
def test_unknown_key_names_the_closest_existing_keys(key, closest):
  msg = config_lib.unknown_key_message(config_lib.default_config(), key)
  assert msg.startswith(f"config.{key} is not a known field; closest: ") and "\n" not in msg
  if closest:
    assert msg.split("closest: ")[1].split(", ")[0] == closest
  with pytest.raises(config_lib.ConfigError, match=f"closest: {closest}" if closest else "closest"):
    config_lib.with_overrides(load("default"), {key: 1})


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "dr_grpo"])
def test_group_size_one_is_rejected_for_group_relative_advantages(advantage):
  c = config_lib.with_overrides(load("default"), {"rl.group_size": 1, "rl.advantage": advantage,
                                                  "rl.prompts_per_step": 8})
  with pytest.raises(config_lib.ConfigError, match=r"config\.rl\.group_size must be >= 2"):
    config_lib.validate(c)


def test_max_consecutive_skips_is_checked():
  c = config_lib.with_overrides(load("default"), {"checkpoint.max_consecutive_skips": 0})
  with pytest.raises(config_lib.ConfigError, match=r"checkpoint\.max_consecutive_skips must be >= 1"):
    config_lib.validate(c)
