"""What every experiments/ script shares: where runs and figures go, and the CSV / markdown / PNG writers."""
from __future__ import annotations

import csv
import os
from typing import Iterable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Read at call time (never bound at import), so a caller may point them elsewhere (tests do).
DEFAULT_RUNS = os.path.join(REPO, "experiments", "runs")
DEFAULT_FIGURES = os.path.join(REPO, "experiments", "figures")


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence]) -> str:
  """Writes `rows` under `header` (floats with 6 significant digits); returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for r in rows:
      w.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else v for v in r])
  return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
  fmt = lambda v: f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # noqa: PLC0415 - optional until a figure is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt
