"""Kept path: `python experiments/bound_tables.py` runs `python -m experiments.paper.bound_tables`.

No path set-up here: `experiments` resolves as the installed package (`pip install -e .`).
"""
import sys

from experiments.paper.bound_tables import main, matches  # noqa: F401 - callers loading this file use both

if __name__ == "__main__":
  sys.exit(1 if main(sys.argv[1:]) else 0)
