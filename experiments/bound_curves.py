"""Kept path: `python experiments/bound_curves.py ARGS` runs `python -m experiments.paper.bound_curves ARGS`.

No path set-up here: `experiments` resolves as the installed package (`pip install -e .`).
"""
from experiments.paper.bound_curves import main

if __name__ == "__main__":
  main()
