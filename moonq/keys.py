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
    P:recent            zset job id -> enqueued_at of every job submitted in the last ``result_ttl_s``
                               (the web console's jobs list, newest first): written at submit, trimmed
                               by age on each write, and the key expires ``result_ttl_s`` after the last.
    P:recent:<tenant>   zset the same for one tenant's jobs (a tenant's console list).
    P:deliveries        stream the hand-off of webhooks and Celery callbacks owed by ended jobs: one entry
                               (``kind``, ``job``) per delivery, added by the write that ends the job
                               (moonq/eventlog.py), read by the nodes' delivery workers through the
                               consumer group ``nodes``, and deleted once handled (worker/deliveries.py).
    P:deliveries:due    zset   delivery id -> when its next attempt is due (unix s): the retries waiting;
                               each goes back into the stream when due, and leaves the zset as it does.
    P:deliveries:dead   zset   delivery id -> when it gave up (the deliveries' dead letters); entries older
                               than ``result_ttl_s`` are trimmed on each insert, and the key expires.
    P:delivery:<id>     hash   a delivery's state once it has failed an attempt: its body as first built,
                               target, attempts, last error; expires after the retries' horizon (or
                               ``result_ttl_s`` after it gave up), deleted once delivered.
    P:limit:*           the fleet limiter's state; names in ``worker/limiter_state.py``.
    P:budget:<tenant>:<YYYY-MM-DD>
                        hash   a tenant's spend on a UTC day, ``{tokens, usd}``; expires two days after
                               its last write (moonq/budgets.py).
    P:nodes             zset metrics URL -> last heartbeat (unix s) of each live node, for ``moonq top``.
    P:console:session_key
                        string the web console's session-signing key: 32 random bytes, made once (SET NX)
                               by the first gateway that needs it and read by every other; kept for the
                               deployment's life (to change it, delete it and restart every gateway).

The Celery broker's own keys (queue lists, unacked hash) get ``P:`` as kombu's
``global_keyprefix``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from moonq.record import DEFAULT_TENANT


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

    def idempotency(self, key: str, tenant: str = DEFAULT_TENANT) -> str:
        """An idempotency key's name: per tenant, so two tenants' ``order-42`` never meet.

        The default tenant's keep the name they had before tenants existed.
        """
        scoped = key if tenant == DEFAULT_TENANT else f"{tenant}\n{key}"
        return f"{self.prefix}:idem:{hashlib.sha256(scoped.encode()).hexdigest()}"

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
    def recent(self) -> str:
        return f"{self.prefix}:recent"

    def recent_of(self, tenant: str) -> str:
        """One tenant's recent-jobs index: its console list, without scanning every tenant's jobs."""
        return f"{self.prefix}:recent:{tenant}"

    @property
    def deliveries(self) -> str:
        return f"{self.prefix}:deliveries"

    @property
    def deliveries_due(self) -> str:
        return f"{self.prefix}:deliveries:due"

    @property
    def deliveries_dead(self) -> str:
        return f"{self.prefix}:deliveries:dead"

    def delivery(self, delivery_id: str) -> str:
        return f"{self.prefix}:delivery:{delivery_id}"

    @property
    def console_session_key(self) -> str:
        return f"{self.prefix}:console:session_key"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def broker_prefix(self) -> str:
        return f"{self.prefix}:"
