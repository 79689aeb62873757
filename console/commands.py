"""What the job subcommands of ``moonq`` do, over an open ``Client``; ``console/cli.py`` parses the line.

Each function prints its output and returns the process exit code; SDK errors propagate and
``console/cli.py`` turns them into exit codes (invalid request 2, no such job 3, other 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Unpack

from console.records import fetch_record
from console.render import Renderer
from moonq.deliveries import delivery_tenant, failed_deliveries, redeliver
from moonq.errors import InvalidRequest
from moonq.record import JobField
from producers import Client, JobOptions

DEFAULT_MODEL = "kimi-k2.5"

# What ``moonq status`` shows of a record, in this order, as stored (text).
STATUS_FIELDS = (
    JobField.STATUS,
    JobField.MODEL,
    JobField.ATTEMPT,
    JobField.ENQUEUED_AT,
    JobField.STARTED_AT,
    JobField.FINISHED_AT,
)


def build_request(
    *, file: str | None, prompt: str | None, model: str | None, system: str | None, max_tokens: int | None
) -> dict[str, Any]:
    """The chat-completions request of ``moonq submit``: ``file`` (``-`` = stdin) or a prompt.

    ``model`` overrides the file's; without a file it defaults to ``DEFAULT_MODEL``.
    """
    if file:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
        try:
            request = json.loads(text)
        except ValueError as err:
            raise InvalidRequest([("--file", f"is not valid JSON: {err}")]) from None
        if isinstance(request, dict) and model:
            request["model"] = model
        return request  # type: ignore[no-any-return]
    if not prompt:
        raise InvalidRequest([("prompt", "give a prompt, or --file with a request")])
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    request = {"model": model or DEFAULT_MODEL, "messages": messages}
    if max_tokens:
        request["max_completion_tokens"] = max_tokens
    return request


def follow(client: Client, job_id: str, *, as_json: bool) -> int:
    """Print a job's events until its end: 0 completed, 1 failed, 130 cancelled."""
    renderer = Renderer(sys.stdout)
    code = 0
    for event in client.job(job_id).events():
        if as_json:
            print(event.model_dump_json(exclude_none=True), flush=True)
        else:
            renderer.event(event)
        if event.type == "failed":
            code = 1
        elif event.type == "cancelled":
            code = 130
        elif event.type == "completed" and not as_json:
            usage = (event.result or {}).get("usage") or {}
            print(
                f"[job {job_id}: {usage.get('prompt_tokens', '?')} prompt + "
                f"{usage.get('completion_tokens', '?')} completion tokens]",
                file=sys.stderr,
            )
    return code


def submit(
    client: Client,
    request: dict[str, Any],
    *,
    priority: int,
    idempotency_key: str | None,
    no_wait: bool,
    as_json: bool,
    **options: Unpack[JobOptions],
) -> int:
    """Submit; ``no_wait``: print the id on stdout, else ``[job ID]`` on stderr and follow the job."""
    job = client.submit(request, priority=priority, idempotency_key=idempotency_key, **options)
    print(job.id if no_wait else f"[job {job.id}]", file=sys.stdout if no_wait else sys.stderr, flush=True)
    return 0 if no_wait else follow(client, job.id, as_json=as_json)


def status(client: Client, job_id: str) -> int:
    """The record's state fields as stored, and its error parsed, as JSON."""
    record, stored = fetch_record(client, job_id)
    shown: dict[str, Any] = {str(name): stored[name] for name in STATUS_FIELDS if name in stored}
    if record.error:
        shown[JobField.ERROR.value] = record.error_info()
    print(json.dumps({"id": job_id, **shown}, indent=2))
    return 0


def result(client: Client, job_id: str, timeout_s: float | None) -> int:
    print(client.job(job_id).result(timeout=timeout_s).model_dump_json(indent=2, exclude_none=True))
    return 0


def cancel(client: Client, job_id: str) -> int:
    ended = client.job(job_id).cancel()
    print("cancel requested" if ended else "job had already ended")
    return 0


def batch(client: Client, src: str, dst: str, window: int) -> int:
    """Run a batch file (``console/batch.py``); the counts and the output path on stderr."""
    from console.batch import run_batch

    answered, failed = run_batch(client, Path(src), Path(dst), window=window)
    print(f"{answered} line(s) answered, {failed} failed; output: {dst}", file=sys.stderr)
    return 0


def failed(client: Client, limit: int, *, as_json: bool) -> int:
    """The dead letters, newest first: a line each (count on stderr), or the rows as JSON."""
    rows = client.failed(limit)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        err = row["error"]
        print(f"{row['id']}  {row['model']:<24} attempts={row['attempts']:<3} {err.get('type')}: {err.get('message')}")
    print(f"{len(rows)} failed job(s)", file=sys.stderr)
    return 0


def retry(client: Client, job_id: str) -> int:
    print(client.retry(job_id).id)
    return 0


def webhooks_failed(client: Client, limit: int, *, as_json: bool) -> int:
    """The dead deliveries, newest first: a line each (count on stderr), or the rows as JSON."""
    rows = failed_deliveries(client.redis, client.keys, limit, client.tenant)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['id']}  {row['target'] or '-'}  attempts={row['attempts']:<3} {row['error'] or ''}")
    print(f"{len(rows)} failed deliveries", file=sys.stderr)
    return 0


def webhooks_redeliver(client: Client, delivery: str) -> int:
    """Put a dead delivery back in line; 3 if it is no dead letter (or, with ``--tenant``, another tenant's)."""
    try:
        theirs = client.tenant is not None and delivery_tenant(client.redis, client.keys, delivery) != client.tenant
        again = not theirs and redeliver(client.redis, client.keys, delivery, ttl_s=client.settings.result_ttl_s)
    except ValueError as err:
        raise InvalidRequest([("ID", str(err))]) from None
    if not again:
        print(f"moonq: no such failed delivery: {delivery}", file=sys.stderr)
        return 3
    print(f"{delivery} queued for delivery")
    return 0
