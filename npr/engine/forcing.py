"""Deprecated alias: the forced-structure workload moved to npr.bench.forcing (it is a benchmark
and test workload, not part of the engine). Kept only while npr/bench/speedup.py, which this
change may not edit, still imports it from here; import npr.bench.forcing instead."""
from npr.bench.forcing import ForcedStructure  # noqa: F401
