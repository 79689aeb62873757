"""``moonq batch IN.jsonl -o OUT.jsonl``: the OpenAI/Moonshot batch line format through the queue.

Input lines are ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``;
output lines are ``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {"code", "message"} | null}``, one per custom_id, in completion order.

Both files are streamed and at most ``window`` jobs are in flight, so memory is bounded by the
window (plus the set of custom ids) whatever the file's length. Resuming is by output: a run
skips every custom_id the output already holds, and each line is submitted with an
idempotency key derived from its custom_id and body, so a line that was in flight when a run
was interrupted is picked up again as the same job, not sent upstream twice.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from console.records import find_record
from moonq.errors import InvalidRequest
from moonq.record import TERMINAL_STATUSES, JobField, JobRecord, JobStatus
from producers.client import Client

CHAT_URLS = ("/v1/chat/completions", "/chat/completions")


class Progress:
    """A batch run's progress on ``out`` (stderr): done/total, rate, ETA and failures.

    On a terminal a rich progress bar redraws in place; otherwise a plain line is printed at
    most every 0.2 s and at the end, so logs show the progress without terminal codes. Use as a
    context manager (the bar is drawn between enter and exit).
    """

    def __init__(self, total: int, out: TextIO | None = None) -> None:
        self.total = total
        self.out = out or sys.stderr
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> Progress:
        if self.out.isatty():
            self._bar = RichProgress(
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("failed {task.fields[failed]}"),
                console=Console(file=self.out),
            )
            self._task = self._bar.add_task("batch", total=self.total, failed=0)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.done, failed=self.failed)
            return
        now = time.monotonic()
        if now - self._last_draw > 0.2 or self.done == self.total:
            self._last_draw = now
            self.out.write(self.line(now) + "\n")
            self.out.flush()

    def line(self, now: float) -> str:
        """The plain progress line: ``[###...] done/total rate/s ETA mm:ss failed n``."""
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "--:--" if left == float("inf") else f"{int(left) // 60:02d}:{int(left) % 60:02d}"
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
            f" {rate:.1f}/s ETA {eta} failed {self.failed}"
        )


class _RateColumn(ProgressColumn):
    """Lines answered per second (rich's estimate over the last 30 s)."""

    def render(self, task: Task) -> Text:
        return Text("-/s" if task.speed is None else f"{task.speed:.1f}/s")


def answered_ids(path: Path) -> set[str]:
    """custom_ids already in an output file (a torn last line from a crash is ignored)."""
    done: set[str] = set()
    if not path.exists():
        return done
    with path.open() as f:
        for line in f:
            try:
                done.add(json.loads(line)["custom_id"])
            except (ValueError, KeyError, TypeError):
                continue
    return done


def parse_line(line: str, number: int) -> tuple[str, dict[str, Any]]:
    """``(custom_id, body)`` of one input line, or ``InvalidRequest`` naming what is wrong."""
    where = f"line {number}"
    try:
        item = json.loads(line)
    except ValueError as err:
        raise InvalidRequest([(where, f"is not valid JSON: {err}")]) from None
    if not isinstance(item, dict):
        raise InvalidRequest([(where, "must be a JSON object")])
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequest([(f"{where}.custom_id", "is required (a non-empty string)")])
    if item.get("method", "POST") != "POST" or item.get("url", CHAT_URLS[0]) not in CHAT_URLS:
        raise InvalidRequest([(f"{where}", "only POST /v1/chat/completions is supported")])
    if not isinstance(item.get("body"), dict):
        raise InvalidRequest([(f"{where}.body", "is required (the chat-completions request)")])
    return custom_id, item["body"]


def output_line(custom_id: str, job_id: str | None, rec: JobRecord | None, error: tuple[str, str] | None) -> str:
    """One output line in the batch output shape: ``error`` (code, message), else the ended job's ``rec``."""
    out: dict[str, Any] = {
        "id": f"batch_req_{job_id or custom_id}",
        "custom_id": custom_id,
        "response": None,
        "error": None,
    }
    if error is not None:
        out["error"] = {"code": error[0], "message": error[1]}
    elif rec is not None and rec.status == JobStatus.SUCCEEDED:
        out["response"] = {"status_code": 200, "request_id": job_id, "body": rec.result_data()}
    elif rec is not None:
        err = rec.error_info() or {"type": "cancelled", "message": "the job was cancelled"}
        if err.get("status"):  # the upstream answered with an error: pass its answer through
            body = {"error": {"message": err.get("message"), "type": err.get("type")}}
            out["response"] = {"status_code": err["status"], "request_id": job_id, "body": body}
        else:
            out["error"] = {"code": err.get("type"), "message": err.get("message")}
    return json.dumps(out, ensure_ascii=False)


def idempotency_key(custom_id: str, body: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
    return f"batch:{custom_id}:{digest}"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def run_batch(client: Client, src: Path, dst: Path, *, window: int = 500, poll_s: float = 0.2) -> tuple[int, int]:
    """Run every unanswered line of ``src`` and append answers to ``dst``; returns (answered, failed)."""
    done = answered_ids(dst)
    todo = sum(1 for _, line in _lines(src)) - len(done)
    pending: dict[str, str] = {}  # job id -> custom_id
    seen: set[str] = set(done)
    with Progress(max(todo, 0)) as progress, dst.open("a") as out:

        def write(line: str, ok: bool) -> None:
            out.write(line + "\n")
            out.flush()
            progress.add(ok)

        for number, line in _lines(src):
            try:
                custom_id, body = parse_line(line, number)
                if custom_id in seen:
                    continue
                seen.add(custom_id)
                job = client.submit(body, idempotency_key=idempotency_key(custom_id, body))
                pending[job.id] = custom_id
            except InvalidRequest as err:
                cid = _custom_id_of(line) or f"line-{number}"
                if cid not in done:
                    write(output_line(cid, None, None, ("invalid_request", str(err))), False)
                continue
            if len(pending) >= window:
                # Drain a tenth of the window before sending more: each scan of the pending jobs
                # then answers many lines, not one (a scan costs one HGET per pending job).
                _drain(client, pending, write, poll_s, down_to=window - max(1, window // 10))
        _drain(client, pending, write, poll_s, down_to=0)
    return progress.done, progress.failed


def _drain(client: Client, pending: dict[str, str], write: Any, poll_s: float, *, down_to: int) -> None:
    """Scan the pending jobs every ``poll_s`` until at most ``down_to`` are left."""
    while True:
        _collect(client, pending, write)
        if len(pending) <= down_to:
            return
        time.sleep(poll_s)


def _custom_id_of(line: str) -> str | None:
    try:
        value = json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _collect(client: Client, pending: dict[str, str], write: Any) -> None:
    """Write out every pending job that has ended."""
    ids = list(pending)
    with client.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(client.keys.job(job_id), JobField.STATUS)
        statuses = pipe.execute()
    for job_id, status in zip(ids, statuses, strict=True):
        if status is not None and status.decode() not in TERMINAL_STATUSES:
            continue  # still to run, or running
        rec = find_record(client, job_id) if status is not None else None
        if rec is None:  # the record expired before we read it: say so rather than wait forever
            write(output_line(pending.pop(job_id), job_id, None, ("job_expired", "the job record expired")), False)
        else:
            write(output_line(pending.pop(job_id), job_id, rec, None), rec.status == JobStatus.SUCCEEDED)
