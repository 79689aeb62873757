"""Reading a job's record for the console, through ``moonq.record``'s typed reader."""

from __future__ import annotations

from typing import Any, cast

from moonq.errors import JobNotFound
from moonq.record import JobRecord, decode_hash
from producers.client import Client


def stored_fields(client: Client, job_id: str) -> dict[str, str]:
    """The record's fields as stored (text); ``{}`` when there is no such job."""
    return decode_hash(cast("dict[Any, Any]", client.redis.hgetall(client.keys.job(job_id))))


def find_record(client: Client, job_id: str) -> JobRecord | None:
    """The job's record, typed; None when there is none (never submitted, or expired)."""
    return JobRecord.from_redis(stored_fields(client, job_id))


def fetch_record(client: Client, job_id: str) -> tuple[JobRecord, dict[str, str]]:
    """The job's record, typed, and its fields as stored (for output that shows them verbatim).

    Raises:
        JobNotFound: no such job (never submitted, or its record expired).
    """
    stored = stored_fields(client, job_id)
    record = JobRecord.from_redis(stored)
    if record is None:
        raise JobNotFound(job_id)
    return record, stored
