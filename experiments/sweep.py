"""Kept path: `python experiments/sweep.py ARGS` runs `python -m experiments.paper.sweep ARGS`.

No path set-up here: `experiments` resolves as the installed package (`pip install -e .`).
"""
from experiments.paper.sweep import main

if __name__ == "__main__":
  main()
