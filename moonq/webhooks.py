"""Webhooks and callbacks, the pure part: the options a producer gives, the body, the signature.

A producer names where a job's outcome goes (``webhook``, ``on_done``, ``on_done_queue``); the
options are checked here before anything is enqueued and stored in the job's record, never in the
request or the task message. When the job ends, a node delivers (worker/deliveries.py): a webhook
is one JSON body, signed as the Standard Webhooks specification describes, so a receiver verifies
it with that specification's own libraries:

    webhook-id         the delivery's id, the same on every attempt (receivers de-duplicate on it)
    webhook-timestamp  unix seconds of this attempt
    webhook-signature  ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, one per secret,
                       space-separated (during a rotation a receiver holding either secret verifies)

Besides the job's ending, a producer may subscribe its webhook to progress events
(``webhook_events``): ``started`` (the job's first attempt began) and ``retry`` (an attempt ended
without an answer and another follows). Each is its own delivery with its own id, handed off in the
same atomic write that records the event (moonq/eventlog.py, worker/delivery.py).

Secrets are ``whsec_<base64>`` values (``MOONQ_WEBHOOK_SECRET``, comma-separated, newest first).
The URL is the record's (a tenant's default ``webhook_url`` is written there at submit); the keys
are the tenant's ``webhook_secrets`` if the tenants file gives it some, else the node's.
docs/webhooks.md is the receiver's guide.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from moonq.errors import InvalidRequest
from moonq.record import JobField, JobRecord, JobStatus

SECRET_PREFIX = "whsec_"
# The specification asks for secrets of 24 to 64 random bytes.
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
MAX_URL_CHARS = 2048
DEFAULT_CALLBACK_QUEUE = "celery"
WEBHOOK, CALLBACK = "webhook", "callback"
KINDS = (WEBHOOK, CALLBACK)
# The progress events a webhook may subscribe to, beyond the job's ending (which it always gets).
STARTED, RETRY = "started", "retry"
PROGRESS_EVENTS = (STARTED, RETRY)
# A Celery task name (``myapp.tasks.handle_answer``) or queue name: no spaces, no control characters.
_NAME = re.compile(r"[A-Za-z0-9_.:\-/@]{1,255}")
# The event type in a webhook's body, by the job's terminal status.
EVENT_TYPES = {
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled",
}


# ---- the producer's options ------------------------------------------------------------------


def check_webhook_url(url: object, field: str = "webhook") -> str:
    """``url`` as a webhook URL: an absolute ``https://`` or ``http://`` URL with a host.

    Whether the node will call it (public address, https, allow-list) is decided when it delivers:
    producers do not know the nodes' ``MOONQ_WEBHOOK_ALLOW``.

    Raises:
        InvalidRequest: naming ``field``.
    """
    if not isinstance(url, str) or not url:
        raise InvalidRequest([(field, "must be a non-empty URL string")])
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest([(field, f"must be at most {MAX_URL_CHARS} characters (got {len(url)})")])
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise InvalidRequest([(field, "must be an ASCII URL without spaces or control characters")])
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as err:
        raise InvalidRequest([(field, f"is not a URL: {err}")]) from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidRequest([(field, f"must be an https:// (or http://) URL with a host (got {url[:60]!r})")])
    if parts.username or parts.password:
        raise InvalidRequest([(field, "must not hold credentials (put a token in the path or query instead)")])
    return url


def _check_name(value: object, field: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = value[:60] if isinstance(value, str) else value
        raise InvalidRequest([(field, f"must be 1 to 255 letters, digits or . _ - : / @ (got {shown!r})")])
    return value


def check_webhook_events(events: object, field: str = "webhook_events") -> str:
    """``events`` (names, or one comma-separated string) as the record's ``webhook_events``: ``started,retry``.

    Raises:
        InvalidRequest: naming ``field``: not strings, or a name that is no progress event.
    """
    names = events.split(",") if isinstance(events, str) else events
    if not isinstance(names, list | tuple | set | frozenset) or not all(isinstance(n, str) for n in names):
        raise InvalidRequest([(field, f"must be a list of event names from {list(PROGRESS_EVENTS)}")])
    wanted = {n.strip().lower() for n in names} - {""}
    unknown = sorted(wanted - set(PROGRESS_EVENTS))
    if unknown:
        shown = ", ".join(repr(n[:40]) for n in unknown[:3])
        raise InvalidRequest(
            [(field, f"{shown} is not an event a webhook can subscribe to; use {' or '.join(PROGRESS_EVENTS)}")]
        )
    return ",".join(e for e in PROGRESS_EVENTS if e in wanted)


def callback_fields(
    *,
    webhook: str | None = None,
    webhook_events: object = None,
    on_done: str | None = None,
    on_done_queue: str | None = None,
) -> dict[str, str]:
    """The job-record fields (``JobField.WEBHOOK`` ...) for a submit's options; ``{}`` for none.

    Raises:
        InvalidRequest: an option breaks its rule, ``webhook_events`` is given without ``webhook``,
            or ``on_done_queue`` without ``on_done``.
    """
    fields: dict[str, str] = {}
    if webhook is not None:
        fields[JobField.WEBHOOK] = check_webhook_url(webhook)
    if webhook_events is not None:
        if webhook is None:
            raise InvalidRequest([("webhook_events", "needs webhook (the URL the events go to)")])
        events = check_webhook_events(webhook_events)
        if events:
            fields[JobField.WEBHOOK_EVENTS] = events
    if on_done is not None:
        fields[JobField.ON_DONE] = _check_name(on_done, "on_done")
    if on_done_queue is not None:
        if on_done is None:
            raise InvalidRequest([("on_done_queue", "needs on_done (the task to send)")])
        fields[JobField.ON_DONE_QUEUE] = _check_name(on_done_queue, "on_done_queue")
    return fields


# ---- secrets and signatures ------------------------------------------------------------------


def parse_secrets(text: str) -> list[bytes]:
    """``MOONQ_WEBHOOK_SECRET``'s comma-separated ``whsec_<base64>`` values, newest first, as keys.

    Raises:
        ValueError: a value without the prefix, not base64, or of a length the specification refuses.
            The message never shows a secret.
    """
    keys = []
    for n, raw in enumerate((part.strip() for part in text.split(",")), start=1):
        if not raw:
            continue
        if not raw.startswith(SECRET_PREFIX):
            raise ValueError(f"secret {n} does not start with {SECRET_PREFIX!r}")
        try:
            key = base64.b64decode(raw.removeprefix(SECRET_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"secret {n} is not base64 after {SECRET_PREFIX!r}") from None
        if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
            raise ValueError(f"secret {n} is {len(key)} bytes; use {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}")
        keys.append(key)
    return keys


def signature(secrets: Sequence[bytes], msg_id: str, timestamp_s: int, body: bytes) -> str:
    """``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` per secret, space-separated, in the secrets' order."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in secrets
    )


def signed_headers(secrets: Sequence[bytes], msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt: the Standard Webhooks three and the content type."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": signature(secrets, msg_id, timestamp_s, body),
    }


# ---- the body --------------------------------------------------------------------------------


def delivery_id(kind: str, job_id: str, event: str = "", seq: int | str = "") -> str:
    """A delivery's id: the ``webhook-id`` header, the callback's Celery task id.

    ``webhook:<job id>`` (or ``callback:<job id>``) for the job's ending; ``webhook:<job id>:started``
    and ``webhook:<job id>:retry:<seq>`` (the event's seq) for progress events. Job ids are UUIDs.
    """
    if event == RETRY:
        return f"{kind}:{job_id}:{RETRY}:{seq}"
    if event:
        return f"{kind}:{job_id}:{event}"
    return f"{kind}:{job_id}"


def parse_delivery_id(delivery: str) -> tuple[str, str]:
    """``(kind, job id)`` of a delivery id.

    Raises:
        ValueError: not a delivery id.
    """
    kind, _, rest = delivery.partition(":")
    job_id, _, event = rest.partition(":")
    plausible = not event or event == STARTED or (event.startswith(f"{RETRY}:") and event[len(RETRY) + 1 :].isdigit())
    if kind not in KINDS or not job_id or not plausible:
        raise ValueError(f"not a delivery id: {delivery[:80]!r}")
    return kind, job_id


def outcome_data(job_id: str, rec: JobRecord, *, usage_cost_usd: float | None) -> dict[str, Any]:
    """What the job's ending says, as the webhook body's ``data`` (and the callback's arguments)."""
    result = _json(rec.result) if rec.status is JobStatus.SUCCEEDED else None
    return {
        "id": job_id,
        "tenant": rec.tenant,
        "status": rec.status.value,
        "model": rec.model or None,
        "attempts": rec.attempt,
        "result": result,
        "error": _json(rec.error),
        "usage": (result or {}).get("usage"),
        "cost_usd": usage_cost_usd,
        "enqueued_at": rec.enqueued_at,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at,
        "retry_of": rec.retry_of,
    }


def webhook_body(job_id: str, rec: JobRecord, *, usage_cost_usd: float | None) -> dict[str, Any]:
    """The webhook's JSON body, in the specification's ``{type, timestamp, data}`` envelope.

    ``timestamp`` is when the job ended (ISO 8601, UTC), not when this attempt was made.
    """
    ended = _iso(rec.finished_at) if rec.finished_at else None
    return {
        "type": EVENT_TYPES.get(rec.status, f"job.{rec.status.value}"),
        "timestamp": ended,
        "data": outcome_data(job_id, rec, usage_cost_usd=usage_cost_usd),
    }


def progress_body(job_id: str, rec: JobRecord, event: str, seen: dict[str, Any]) -> dict[str, Any]:
    """A progress event's webhook body (``job.started``, ``job.retry``), in the same envelope.

    ``seen`` is what the event said when it was written: for ``started`` the attempt and its start
    time; for ``retry`` the event itself (``attempt`` = the next attempt, ``reason``, ``delay_s``,
    ``resume``). ``timestamp`` is when the event happened.
    """
    at = float(seen.get("ts") or seen.get("started_at") or rec.started_at or 0.0)
    data: dict[str, Any] = {
        "id": job_id,
        "tenant": rec.tenant,
        "status": JobStatus.RUNNING.value if event == STARTED else JobStatus.RETRYING.value,
        "model": rec.model or None,
        "attempt": int(seen.get("attempt") or rec.attempt or 1),
        "enqueued_at": rec.enqueued_at,
        "started_at": rec.started_at,
    }
    if event == RETRY:
        data |= {k: seen.get(k) for k in ("reason", "delay_s", "resume")}
    return {"type": f"job.{event}", "timestamp": _iso(at), "data": data}


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


def callback_args(job_id: str, rec: JobRecord) -> list[Any]:
    """The Celery callback's positional arguments: job id, status, and the result (succeeded) or error."""
    if rec.status is JobStatus.SUCCEEDED:
        return [job_id, rec.status.value, _json(rec.result)]
    return [job_id, rec.status.value, _json(rec.error)]


def _json(text: str | None) -> Any:
    """A record's JSON field; NaN and Infinity (an upstream may send them) become null, as JSON has neither."""
    return json.loads(text, parse_constant=lambda _: None) if text else None
