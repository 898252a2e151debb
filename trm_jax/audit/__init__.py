"""Offline TRM audit of rollouts made by any engine: `python -m trm_jax.audit --help`.

Reads a rollout dump (our JSONL schema, vLLM `RequestOutput` JSON, or OpenAI-compatible completions with
log-probs) and an HF checkpoint, and reports what TRM would have masked, how acceptance falls with length,
which bound is tightest and how far apart the two engines are (schema.py, adapters.py -> compute.py ->
analysis.py -> report.py; auditor.py runs them in that order).
"""
