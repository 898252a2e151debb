"""Statistics read from a compiled (per-device, optimized) HLO module's text, for trm_jax.plan.

`largest_buffers`: the biggest array shapes (the temporaries that decide whether a step fits).
`collective_bytes`: bytes each collective kind moves per chip per step, with every op inside a `while`
body counted `known_trip_count` times (the layer scan, the chunked log-prob pass and the decode loop are
while loops; XLA's own cost analysis counts their bodies once).

Bytes moved per chip, from the result shape R of each op and its replica-group size n (ring algorithms):
  all-gather R (n-1)/n;  reduce-scatter R (n-1);  all-reduce 2 R (n-1)/n;  all-to-all R (n-1)/n;
  collective-permute R.
A step's ICI time is then sum(bytes) / the chip's ICI bandwidth (no overlap with compute assumed).
"""
from __future__ import annotations

import collections
import math
import re

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8,
               "s16": 2, "u16": 2, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(%?([\w.\-]*)")
CALLEE = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|"
                     r"false_computation)=(?:\{([^}]*)\}|%?([\w.\-]+))")
TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _array_bytes(type_text: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES[dt]
             for dt, dims in _ARRAY.findall(type_text))


def largest_buffers(hlo_text: str, k: int = 5) -> list[tuple[int, str]]:
  """The k largest array shapes in an optimized (per-device) HLO module: its big temporaries."""
  seen = {f"{dt}[{dims}]": _array_bytes(f"{dt}[{dims}]") for dt, dims in _ARRAY.findall(hlo_text)}
  return sorted(((b, s) for s, b in seen.items()), reverse=True)[:k]


def _group_size(line: str) -> int:
  """Devices per replica group: iota form `replica_groups=[G,n]<=...` or explicit `{{0,1,..},...}`."""
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return max(1, len([d for d in m.group(1).split(",") if d]))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)  # mesh['a'=4,'b'=2] {'b'}
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)) if a in sizes) or 1
  return 2  # unknown: the smallest group that moves anything


def _moved(kind: str, result_bytes: int, n: int) -> float:
  if n <= 1:
    return 0.0
  return {"all-gather": result_bytes * (n - 1) / n, "reduce-scatter": result_bytes * (n - 1),
          "all-reduce": 2 * result_bytes * (n - 1) / n, "all-to-all": result_bytes * (n - 1) / n,
          "collective-permute": float(result_bytes)}[kind]


def _bodies(hlo_text: str) -> tuple[str | None, dict[str, list[str]]]:
  """(entry computation name, computation name -> its instruction lines)."""
  body_of, current, entry = collections.defaultdict(list), None, None
  for line in hlo_text.splitlines():
    m = COMPUTATION.match(line)
    if m:
      current = m.group(1)
      if line.lstrip().startswith("ENTRY"):
        entry = current
      continue
    if current is not None:
      body_of[current].append(line)
  return entry, body_of


def computation_runs(hlo_text: str) -> collections.Counter:
  """Executions of each computation per execution of the module: the entry once, a while body
  `known_trip_count` times per execution of its caller, any other callee once per call."""
  entry, body_of = _bodies(hlo_text)
  runs = collections.Counter({entry: 1} if entry else {})
  order = [entry] if entry else []
  for name in order:
    for line in body_of.get(name, ()):
      trip = TRIP.search(line)
      for role, listed, single in CALLEE.findall(line):
        callees = listed or single
        times = int(trip.group(1)) if (trip and role == "body") else 1
        for callee in re.findall(r"%?([\w.\-]+)", callees):
          if callee in body_of:
            runs[callee] += runs[name] * times
            if callee not in order:
              order.append(callee)
  return runs


def collective_bytes(hlo_text: str) -> dict[str, float]:
  """Bytes moved per chip per execution, by collective kind (COLLECTIVES), loop bodies x trip count."""
  entry, body_of = _bodies(hlo_text)
  if entry is None:
    return {k: 0.0 for k in COLLECTIVES}
  runs = computation_runs(hlo_text)
  out, start_groups = {k: 0.0 for k in COLLECTIVES}, {}
  for name, lines in body_of.items():
    for line in lines:
      m = INSTRUCTION.match(line)
      if not m:
        continue
      inst, result, op, operand = m.groups()
      if op.endswith("-start"):  # async pair: the start holds the groups, the done the result alone
        start_groups[inst] = _group_size(line)
        continue
      kind = op[:-5] if op.endswith("-done") else op
      if kind in out:
        n = start_groups.get(operand, 2) if op.endswith("-done") else _group_size(line)
        out[kind] += runs[name] * _moved(kind, _array_bytes(result), n)
  return out
