"""keyval's benchmark harness (`scripts/bench`): keyval and Redis under the same load.

Modules, each with one job:

- `options`: the command line and its checks; `errors`: the harness's typed errors.
- `histogram`: mergeable log-linear latency histograms; `proc`: CPU seconds and RSS from /proc.
- `resp` (sans-I/O RESP encoder and parser) and `respclient` (a pipelined trio connection).
- `redisserver`: the bench's own redis-server, its INFO, and `redis-benchmark` runs.
- `sessions`: one connection's worth of operations, for keyval and for Redis alike;
  `workloads`: key names and what each workload does per operation.
- `loadgen` (a load-generator process: trio, tasks, latency) and `fanout` (starts them,
  starts the measured window in all of them at once, collects their results).
- `cluster`: starts or attaches to a local keyval cluster.
- `runner`: one whole comparison; `report`: table, JSON and BENCHMARKS.md; `cli`: main.
"""
