"""Every Redis key and channel moonq uses, in one place.

Key families (``P`` = ``MOONQ_PREFIX``, default ``moonq``). ``{g}`` is a job's group tag (``GROUP_TAGS``,
from the last digit of its id): every key of a job, and each index its writes touch in the same script,
carries its group's tag, so each script works in one hash slot and the same names serve one Redis,
Sentinel and Redis Cluster. Whatever lists jobs across the fleet reads the 16 groups' indexes.

    P:job:{g}:<id>      hash   job record: status, model, attempt, times, result, error.
                               Written by the producer at submit and by the worker after;
                               expires ``result_ttl_s`` after the job ends.
    P:log:{g}:<id>      stream replay log; entry id ``<seq>-0``, field ``e`` = event JSON.
                               The explicit id makes Redis refuse a duplicate or out-of-order
                               seq, so a stale writer cannot corrupt the log. Same TTL as the job;
                               capped at ``max_events_per_job`` entries (the oldest go first).
    P:events:{g}:<id>   pub/sub channel carrying the same events live (a shard channel, SPUBLISH, on a
                               Redis Cluster, so a fragment goes to one shard, not to all).
    P:cancel            pub/sub channel on which job ids to cancel are announced to workers.
    P:idem:{g}:<sha256> string "<job id>|<request digest>" for an idempotency key; expires with the job
                               (the record names it in ``idem_key``). Its group is the digest's first
                               digit, and the job submitted with it gets an id in that group.
    P:active:{g}        zset   job id -> last sign of life (unix s, Redis' clock) of every job of the group
                               that has not ended: written at submit, refreshed by the claim and the
                               heartbeats, removed by the write that ends the job. It owns the
                               records, logs and idempotency keys of active jobs (they get their TTL
                               when the job ends); the sweeper (worker/sweeper.py) reads it to find
                               jobs left without a message or a live owner.
    P:sweep             string the lock that lets one node at a time sweep; expires by itself.
    P:failed:{g}        zset job id -> finished_at of jobs that ended failed (the dead letters);
                               entries older than ``result_ttl_s`` are trimmed on each insert.
    P:recent:{g}        zset job id -> enqueued_at of every job submitted in the last ``result_ttl_s``
                               (the web console's jobs list, newest first): written at submit, trimmed
                               by age on each write, and the key expires ``result_ttl_s`` after the last.
    P:recent:<tenant>:{g}
                        zset the same for one tenant's jobs (a tenant's console list).
    P:deliveries:{g}    stream the hand-off of webhooks and Celery callbacks owed by ended jobs: one entry
                               (``kind``, ``job``) per delivery, added by the write that ends the job
                               (moonq/eventlog.py), read by the nodes' delivery workers through the
                               consumer group ``nodes``, and deleted once handled (worker/deliveries.py).
    P:deliveries:due:{g} zset  delivery id -> when its next attempt is due (unix s): the retries waiting;
                               each goes back into its group's stream when due, and leaves the zset as it does.
    P:deliveries:dead:{g} zset delivery id -> when it gave up (the deliveries' dead letters); entries older
                               than ``result_ttl_s`` are trimmed on each insert, and the key expires.
    P:delivery:{g}:<id> hash   a delivery's state once it has failed an attempt: its body as first built,
                               target, attempts, last error; expires after the retries' horizon (or
                               ``result_ttl_s`` after it gave up), deleted once delivered.
    P:{limit}:*         the fleet limiter's state, all in one slot; names in ``worker/limiter_state.py``.
    P:budget:<tenant>:<YYYY-MM-DD>
                        hash   a tenant's spend on a UTC day, ``{tokens, usd}``; expires two days after
                               its last write (moonq/budgets.py).
    P:batch:<run>       set    the custom ids one ``moonq batch`` run has enqueued or found answered (console/batch.py):
                               its memory, outside the process; deleted when the run ends, expires a day after.
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
import os
import zlib
from dataclasses import dataclass

from moonq.record import DEFAULT_TENANT

# A job's keys, and the indexes the write that ends it touches, share a hash tag, so each script sees
# one slot and a Redis Cluster can run it; the jobs spread over GROUPS tags. Tag ``i`` hashes into slots
# [1024 i, 1024 (i + 1)) (tests/test_keys.py checks it), so a cluster with its slots split evenly among up to
# 16 primaries gets an even share of the groups (three primaries: 5, 6 and 5).
GROUP_TAGS = (
    "03",
    "122",
    "212",
    "311",
    "461",
    "562",
    "64",
    "742",
    "843",
    "9",
    "a21",
    "b60",
    "c13",
    "d13",
    "e61",
    "f20",
)
GROUPS = range(len(GROUP_TAGS))
_HEX = "0123456789abcdef"


def group_of(job_id: str) -> int:
    """A job's group: the last hex digit of its id (a uuid4's is random), else a CRC of the id."""
    last = job_id[-1:].lower()
    return _HEX.index(last) if last and last in _HEX else zlib.crc32(job_id.encode()) % len(GROUP_TAGS)


def uuid4_str() -> str:
    """``str(uuid.uuid4())``, built from the same 16 random bytes without the ``UUID`` object (1.2 us
    instead of 3.6: a bulk enqueue makes two per job)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_job_id(group: int | None = None) -> str:
    """A fresh uuid4 job id; with ``group``, one whose last digit puts it in that group (still a uuid4)."""
    job_id = uuid4_str()
    return job_id if group is None else job_id[:-1] + _HEX[group]


@dataclass(frozen=True)
class Keys:
    """Key and channel names under one prefix."""

    prefix: str = "moonq"

    def tag(self, job_id: str) -> str:
        return "{" + GROUP_TAGS[group_of(job_id)] + "}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{self.tag(job_id)}:{job_id}"

    def log(self, job_id: str) -> str:
        return f"{self.prefix}:log:{self.tag(job_id)}:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{self.tag(job_id)}:{job_id}"

    def idempotency(self, key: str, tenant: str = DEFAULT_TENANT) -> str:
        """An idempotency key's name: per tenant, so two tenants' ``order-42`` never meet.

        Its group is the digest's first digit; the job submitted with it gets an id in that group
        (``idempotency_group``), so the claim of the key and the job's writes share a slot.
        """
        digest = _idempotency_digest(key, tenant)
        return f"{self.prefix}:idem:{{{GROUP_TAGS[_HEX.index(digest[0])]}}}:{digest}"

    @staticmethod
    def idempotency_group(key: str, tenant: str = DEFAULT_TENANT) -> int:
        return _HEX.index(_idempotency_digest(key, tenant)[0])

    def _in(self, family: str, group: int) -> str:
        return f"{self.prefix}:{family}:{{{GROUP_TAGS[group]}}}"

    def active_in(self, group: int) -> str:
        return self._in("active", group)

    def active_for(self, job_id: str) -> str:
        return self.active_in(group_of(job_id))

    def failed_in(self, group: int) -> str:
        return self._in("failed", group)

    def failed_for(self, job_id: str) -> str:
        return self.failed_in(group_of(job_id))

    def recent_in(self, group: int, tenant: str | None = None) -> str:
        """The recent-jobs index of a group; with ``tenant``, that tenant's only (its console list,
        without scanning every tenant's jobs)."""
        return self._in("recent" if tenant is None else f"recent:{tenant}", group)

    def deliveries_in(self, group: int) -> str:
        return self._in("deliveries", group)

    def deliveries_for(self, job_id: str) -> str:
        return self.deliveries_in(group_of(job_id))

    def deliveries_due_in(self, group: int) -> str:
        return self._in("deliveries:due", group)

    def deliveries_dead_in(self, group: int) -> str:
        return self._in("deliveries:dead", group)

    def delivery(self, delivery_id: str, job_id: str) -> str:
        """A delivery's state, in its job's group (a delivery id names its job: moonq/webhooks.py)."""
        return f"{self.prefix}:delivery:{self.tag(job_id)}:{delivery_id}"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def sweep_lock(self) -> str:
        return f"{self.prefix}:sweep"

    @property
    def console_session_key(self) -> str:
        return f"{self.prefix}:console:session_key"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def broker_prefix(self) -> str:
        return f"{self.prefix}:"


def _idempotency_digest(key: str, tenant: str) -> str:
    # The default tenant's keys hash as they did before tenants existed.
    scoped = key if tenant == DEFAULT_TENANT else f"{tenant}\n{key}"
    return hashlib.sha256(scoped.encode()).hexdigest()
