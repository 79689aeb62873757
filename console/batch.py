"""``moonq batch IN.jsonl -o OUT.jsonl``: the OpenAI/Moonshot batch line format through the queue.

Input lines are ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``;
output lines are ``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {"code", "message"} | null}``, one per custom_id, in completion order.

Both files are streamed, lines are enqueued with ``submit_many`` in chunks, and at most ``window``
jobs are in flight, so the process's memory is bounded by the window whatever the file's length:
the custom_ids answered or taken (to skip a duplicate line) are kept in a Redis set of the run's,
not here. Resuming is by output: a run first loads every custom_id the output already holds into
that set and skips them, and each line is submitted with an idempotency key derived from its
custom_id and body, so a line that was in flight when a run was interrupted is picked up again as
the same job, not sent upstream twice.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from console.records import find_record
from moonq.errors import InvalidRequest
from moonq.record import TERMINAL_STATUSES, JobField, JobRecord, JobStatus
from producers.client import Client, SubmitItem

CHAT_URLS = ("/v1/chat/completions", "/chat/completions")
# Lines per submit_many (fewer when the window has less room).
SUBMIT_CHUNK = 100
# How long a dead run's set of custom_ids outlives it (a run deletes its own when it ends).
SEEN_TTL_S = 24 * 3600


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


class SeenIds:
    """The custom_ids a run has answered or taken, in a Redis set of the run's own (``P:batch:<run>``).

    Kept in Redis, not in the process, so a batch's memory stays flat in its number of lines. A fresh
    set per run, loaded from the output file first (the output stays the record of what is answered);
    deleted when the run ends, and expires a day after its last write if the run dies.
    """

    def __init__(self, client: Client) -> None:
        self.redis = client.redis
        self.key = f"{client.keys.prefix}:batch:{uuid.uuid4().hex}"

    def add(self, custom_ids: Sequence[str]) -> list[bool]:
        """Add ``custom_ids`` in order; True for each one not there before (the first of duplicates)."""
        if not custom_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for custom_id in custom_ids:
                pipe.sadd(self.key, custom_id)
            pipe.expire(self.key, SEEN_TTL_S)
            return [bool(n) for n in pipe.execute()[:-1]]

    def load(self, path: Path, chunk: int = 1000) -> int:
        """Add the custom_ids already in an output file (a torn last line from a crash is ignored);
        returns how many distinct ones it holds."""
        if not path.exists():
            return 0
        count, batch = 0, []
        with path.open() as f:
            for line in f:
                try:
                    batch.append(json.loads(line)["custom_id"])
                except (ValueError, KeyError, TypeError):
                    continue
                if len(batch) >= chunk:
                    count, batch = count + sum(self.add(batch)), []
        return count + sum(self.add(batch))

    def close(self) -> None:
        self.redis.delete(self.key)


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
    seen = SeenIds(client)
    try:
        todo = sum(1 for _ in _lines(src)) - seen.load(dst)
        pending: dict[str, str] = {}  # job id -> custom_id
        with Progress(max(todo, 0)) as progress, dst.open("a") as out:

            def write(line: str, ok: bool) -> None:
                out.write(line + "\n")
                out.flush()
                progress.add(ok)

            chunk: list[tuple[int, str]] = []
            for number, line in _lines(src):
                chunk.append((number, line))
                if len(chunk) < max(1, min(window - len(pending), SUBMIT_CHUNK)):
                    continue
                _submit(client, seen, chunk, pending, write)
                chunk = []
                if len(pending) >= window:
                    # Drain a tenth of the window before sending more: each scan of the pending jobs
                    # then answers many lines, not one (a scan costs one HGET per pending job).
                    _drain(client, pending, write, poll_s, down_to=window - max(1, window // 10))
            _submit(client, seen, chunk, pending, write)
            _drain(client, pending, write, poll_s, down_to=0)
        return progress.done, progress.failed
    finally:
        seen.close()


def _submit(client: Client, seen: SeenIds, chunk: list[tuple[int, str]], pending: dict[str, str], write: Any) -> None:
    """Enqueue a chunk of input lines with one ``submit_many``: each custom_id not seen before, once;
    then answer the chunk's invalid lines, in input order."""
    parsed: list[tuple[str, dict[str, Any] | None, str]] = []  # (custom_id, body, why it is invalid)
    for number, line in chunk:
        try:
            custom_id, request = parse_line(line, number)
            parsed.append((custom_id, request, ""))
        except InvalidRequest as err:
            parsed.append((_custom_id_of(line) or f"line-{number}", None, str(err)))
    invalid: dict[int, tuple[str, str]] = {}  # position in the chunk -> (custom_id, why)
    items: list[tuple[int, str, SubmitItem]] = []
    for i, ((custom_id, body, why), fresh) in enumerate(zip(parsed, seen.add([p[0] for p in parsed]), strict=True)):
        if not fresh:
            continue
        if body is None:
            invalid[i] = (custom_id, why)
        else:
            items.append((i, custom_id, SubmitItem(body, idempotency_key=idempotency_key(custom_id, body))))
    if items:
        try:
            jobs = client.submit_many([item for _, _, item in items])
            for (_, custom_id, _), job in zip(items, jobs, strict=True):
                pending[job.id] = custom_id
        except InvalidRequest:
            # One bad body refuses the whole chunk: submit it line by line, so each bad line gets its answer.
            for i, custom_id, item in items:
                try:
                    pending[client.submit(item.request, idempotency_key=item.idempotency_key).id] = custom_id
                except InvalidRequest as err:
                    invalid[i] = (custom_id, str(err))
    for i in sorted(invalid):
        write(output_line(invalid[i][0], None, None, ("invalid_request", invalid[i][1])), False)


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
