"""Every Redis key and channel moonq uses, in one place.

Key families (``P`` = ``MOONQ_PREFIX``, default ``moonq``):

    P:job:<id>          hash   job record: status, model, attempt, times, result, error.
                               Written by the producer at submit and by the worker after;
                               expires ``result_ttl_s`` after the job ends.
    P:log:<id>          stream replay log; entry id ``<seq>-0``, field ``e`` = event JSON.
                               The explicit id makes Redis refuse a duplicate or out-of-order
                               seq, so a stale writer cannot corrupt the log. Same TTL as the job;
                               capped at ``max_events_per_job`` entries (the oldest go first).
    P:events:<id>       pub/sub channel carrying the same events live.
    P:cancel            pub/sub channel on which job ids to cancel are announced to workers.
    P:idem:<sha256>     string "<job id>|<request digest>" for an idempotency key; expires with the job
                               (the record names it in ``idem_key``).
    P:active            zset   job id -> last sign of life (unix s, Redis' clock) of every job that
                               has not ended: written at submit, refreshed by the claim and the
                               heartbeats, removed by the write that ends the job. It owns the
                               records, logs and idempotency keys of active jobs (they get their TTL
                               when the job ends); the sweeper (worker/sweeper.py) reads it to find
                               jobs left without a message or a live owner.
    P:sweep             string the lock that lets one node at a time sweep; expires by itself.
    P:failed            zset job id -> finished_at of jobs that ended failed (the dead letters);
                               entries older than ``result_ttl_s`` are trimmed on each insert.
    P:limit:*           the fleet limiter's state; names in ``worker/limiter_state.py``.
    P:nodes             zset metrics URL -> last heartbeat (unix s) of each live node, for ``moonq top``.

The Celery broker's own keys (queue lists, unacked hash) get ``P:`` as kombu's
``global_keyprefix``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key and channel names under one prefix."""

    prefix: str = "moonq"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def log(self, job_id: str) -> str:
        return f"{self.prefix}:log:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def active(self) -> str:
        return f"{self.prefix}:active"

    @property
    def sweep_lock(self) -> str:
        return f"{self.prefix}:sweep"

    @property
    def failed(self) -> str:
        return f"{self.prefix}:failed"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def broker_prefix(self) -> str:
        return f"{self.prefix}:"
