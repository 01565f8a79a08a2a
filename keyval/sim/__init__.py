"""Deterministic simulation support: client histories, their checkers and an in-memory network.

- `keyval.sim.history`: the operation history model and its JSON-lines form.
- `keyval.sim.linearizability`: per-key linearizability of register operations.
- `keyval.sim.checks`: transaction invariants (bank, cycle, lost writes, aborted reads).
- `keyval.sim.network`: a faultable in-memory network of trio streams.
"""
