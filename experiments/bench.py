"""Kept path: `python experiments/bench.py ARGS` runs `python -m experiments.benchmarks.bench ARGS`.

No path set-up here: `experiments` resolves as the installed package (`pip install -e .`).
"""
from experiments.benchmarks.bench import main

if __name__ == "__main__":
  main()
