"""Kept path: `python experiments/paper_figures.py ARGS` runs `python -m experiments.paper.figures ARGS`.

No path set-up here: `experiments` resolves as the installed package (`pip install -e .`).
"""
from experiments.paper.figures import main

if __name__ == "__main__":
  main()
