"""moonq's core: what producers, worker nodes, the gateway and the console share.

It imports none of them (an import-linter contract in ``pyproject.toml`` checks it), so a
worker node loads no client code and a producer loads no worker code.

    errors      the exception tree's base and the producer-side errors
    request     the chat-completions request: every documented field validated
    wire        what crosses the queue: task name, job envelope, events, completions
    keys        every Redis key and channel name
    record      the job record (a Redis hash): its fields, states and the Lua that writes it
    eventlog    a job's event log: the atomic append, the replay log, following in seq order
    settings    where the queue lives (REDIS_URL, broker, prefix, TTLs)
    broker      Celery/kombu configuration both sides must agree on
    connect     the resilient redis.asyncio client

docs/ARCHITECTURE.md draws how the parts fit together.
"""
