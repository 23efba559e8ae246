"""The planner's compiled simulator core (C, loaded with ctypes).

`Simulator` (orchestrator/planner/sim.py) is the reference: it routes every request with the
router's own `Router`, `KvIndex` and policy objects. `NativeSimulator` runs the same event loop,
caches, cost model and policies in C, decision for decision and bit for bit the same
(tests/planner/test_native_equal.py replays both and compares every request's times and workers),
at the simulation speed the planner's searches need. `lib.load()` compiles the sources with the
system C compiler on first use (cached by source hash) and says what failed when it cannot.
"""
