"""Entry point: `python -m trm_jax.main --config=configs/<file>.py:<args> --workdir=<dir>`.

With no flags it runs `configs/default.py` (a small CPU experiment: warm start, then RL with TRM
under a mismatched rollout backend) in ./runs/default. Any field can be overridden from the command
line, e.g. `--config.trm.delta=0.05`. All logic lives in trm_jax.trainer; this file only parses flags.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "default.py"), "Config file (big_vision style: path.py:arg).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints, curves). "
                               "Default: ./runs/<config file name>[_<arg>].")


def _default_workdir(argv_config: str) -> str:
  name, _, arg = (argv_config or "default.py").partition(":")
  name = os.path.splitext(os.path.basename(name))[0]
  tag = arg.replace(",", "_").replace("=", "-") if arg else ""
  return os.path.join("runs", f"{name}_{tag}" if tag else name)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines would drown the progress bar
  from trm_jax import trainer  # after flag parsing, so --help is fast

  workdir = _WORKDIR.value or _default_workdir(flags.FLAGS["config"].serialize().partition("=")[2])
  summary = trainer.train(_CONFIG.value, workdir)
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
  app.run(main)
