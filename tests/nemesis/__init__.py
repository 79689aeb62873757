"""The nemesis: a seeded, Jepsen-style fault run over a real fleet, and a checker over its whole history.

Several real ``celery -A worker worker`` nodes (each reaching Redis, and RabbitMQ in that variant,
through its own ``harness.TcpProxy``), the simulator with random upstream faults behind a tap that
ties every upstream call to its job, producers submitting, duplicating and cancelling jobs, and
followers recording every event they receive. Meanwhile the nemesis, driven by one seed, kills,
stops, pauses and clock-skews nodes, restarts and pauses Redis (AOF on), and cuts or black-holes a
node's links. Afterwards the checker reads everything (replay logs, records, the producers' log,
the followers' views, the upstream calls, the key census) and lists every broken promise as data.

Modules: ``tap`` (upstream calls per job), ``history`` (what was done and seen, and the followers),
``cluster`` (the processes and their faults), ``workload`` (what producers do), ``nemesis`` (the
fault schedule), ``checker`` (the invariants), ``report`` (recovery times, summaries, the
BENCHMARKS.md section), ``run`` (one seed end to end; ``python -m tests.nemesis.run``).
"""
