"""Entry point: `python -m trm_jax.main --config=configs/<file>.py:<args> --workdir=<dir>`.

With no flags it runs `configs/default.py` (a small CPU experiment: warm start, then RL with TRM
under a mismatched rollout backend) in ./runs/default. Any field can be overridden from the command
line, e.g. `--config.trm.delta=0.05`. All logic lives in trm_jax.trainer; this file only parses flags
and turns a user's mistake (a typo'd key, a bad value, a changed resume) into one line, exit code 2.
"""
import os
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file (big_vision style: path.py:arg).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints, curves). "
                               "Default: ./runs/<config file name>[_<arg>].")
_ALLOW = flags.DEFINE_list("allow_config_change", [], "Config fields (dotted, comma-separated) that may differ "
                           "from the checkpointed run on resume, besides checkpoint.ALLOWED_CHANGES.")


def _default_workdir(argv_config: str) -> str:
  name, _, arg = (argv_config or "default.py").partition(":")
  name = os.path.splitext(os.path.basename(name))[0]
  tag = arg.replace(",", "_").replace("=", "-") if arg else ""
  return os.path.join("runs", f"{name}_{tag}" if tag else name)


def _fail(msg: str) -> None:
  print(f"[trm_jax] error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def _explain_flag_error(argv, error: Exception) -> str:
  """One line for a flag-parsing failure: an unknown `--config.a.b` names the key and the closest ones."""
  from trm_jax import config as config_lib
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), _DEFAULT_CONFIG)
  path, _, arg = spec.partition(":")
  try:
    reference = config_lib.load_config(path, arg)
  except Exception as e:  # noqa: BLE001 (the config file itself is broken: say so)
    return f"cannot load --config={spec}: {type(e).__name__}: {e}".splitlines()[0]
  known = set(config_lib._flat_keys(reference))
  for a in argv[1:]:
    if a.startswith("--config.") and "=" in a:
      key = a[len("--config."):].split("=", 1)[0]
      if key not in known and not any(k.startswith(key + ".") for k in known):
        return f"unknown override --config.{key}: " + config_lib.unknown_key_message(reference, key).split("; ", 1)[1]
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[-1] if text else ''}"


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (config_flags raises AttributeError/KeyError/ValueError chains)
    _fail(_explain_flag_error(argv, e))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines would drown the progress bar
  # A warning (e.g. a damaged checkpoint skipped) is one line, not a line plus the source line that raised it.
  warnings.formatwarning = lambda message, category, *args, **kwargs: f"[trm_jax] warning: {message}\n"
  import jax  # after flag parsing, so --help is fast

  from trm_jax import checkpoint as ckpt_lib
  from trm_jax import config as config_lib
  from trm_jax import trainer

  workdir = _WORKDIR.value or _default_workdir(flags.FLAGS["config"].serialize().partition("=")[2])
  try:
    summary = trainer.train(_CONFIG.value, workdir, allow_config_change=tuple(_ALLOW.value))
  except (config_lib.ConfigError, ckpt_lib.RunError) as e:
    _fail(str(e))
  if jax.process_index() != 0:  # multi-process: one summary, from process 0
    return
  if summary.get("preempted") or "complete" in summary:
    return  # the trainer said what happened and where the results are
  final = summary.get("final", {})
  print("\n[trm_jax] done.")
  print(f"  metrics:     {summary['metrics']}")
  print(f"  checkpoints: {summary['checkpoints']}")
  if "curves" in summary:
    print(f"  curves:      {summary['curves']}")
  for key in ("reward/mean", "eval/reward_mean", "trm/accept_rate", "mismatch/kl_max", "bounds/unified"):
    if key in final:
      print(f"  final {key} = {final[key]:.4g}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
