"""What a queued job costs Redis in bytes, against the bytes of its request.

    python -m bench.request_bytes [--rounds K] [--no-write]

For requests of about 1 KB, 100 KB and 10 MB (a text prompt, and base64 images for the larger two),
jobs are submitted with ``Client.submit`` to a private redis-server that no node consumes, so each
stays queued. Two ways, in the same run:

- **ticket** (moonq now): the broker message carries ``{v, job_id, enqueued_at, priority}``; the
  request is in the job's record only.
- **baseline**: the message carries the whole envelope, request included, as moonq sent it before
  (``send_full`` below is that code): the record's copy, the message's, and the message's body
  base64-encoded by kombu.

Per job: ``INFO memory`` ``used_memory`` grown over the jobs (what Redis allocated, allocator size
classes included), and the logical bytes (the record's envelope, plus the message as stored), each
divided by the request's JSON bytes. Medians over K rounds, each on a fresh server.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery

import producers.submitter
from bench.fleets import REPO
from bench.report import line_plot, write_section
from harness import RedisServer
from moonq.broker import message_priority, queue_for, queue_lists
from moonq.record import DEFAULT_TENANT
from moonq.settings import ClientSettings
from moonq.wire import TASK_NAME, JobEnvelope
from producers import Client

SECTION = "## One copy of each request: Redis bytes per queued job"
# (label, request bytes wanted, jobs per round): enough jobs that the growth dwarfs Redis' own noise.
SIZES = (
    ("1 KB", 1_000, 400),
    ("10 KB", 10_000, 200),
    ("100 KB", 100_000, 100),
    ("1 MB", 1_000_000, 20),
    ("10 MB", 10_000_000, 6),
)


def request_of(size: int) -> dict[str, Any]:
    """A chat request of about ``size`` bytes of JSON: a text prompt, or a base64 PNG past 10 KB."""
    if size < 10_000:
        text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[: size - 100]
        return {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": text}]}
    raw = os.urandom(size * 3 // 4 - 200)  # base64 is 4/3 of the raw bytes
    image = "data:image/png;base64," + base64.b64encode(raw).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]
    return {"model": "moonshot-v1-8k-vision-preview", "messages": [{"role": "user", "content": content}]}


def send_full(
    app: Celery, settings: ClientSettings, envelope: JobEnvelope, producer: Any = None, tenant: str = DEFAULT_TENANT
) -> None:
    """The message as moonq sent it before the ticket: the whole envelope, request included."""
    app.send_task(
        TASK_NAME,
        args=[envelope.model_dump(mode="json")],
        task_id=envelope.job_id,
        queue=queue_for(settings, tenant),
        priority=message_priority(settings, envelope.priority),
        producer=producer,
        argsrepr=f"(<job {envelope.job_id} {envelope.request.get('model')}>,)",
        kwargsrepr="{}",
    )


@contextmanager
def sending(send: Callable[..., None] | None) -> Iterator[None]:
    """``Client.submit`` with ``send`` in place of moonq's own send (None: moonq's own)."""
    own = producers.submitter.send_envelope  # type: ignore[attr-defined]
    if send is not None:
        producers.submitter.send_envelope = send  # type: ignore[attr-defined]
    try:
        yield
    finally:
        producers.submitter.send_envelope = own  # type: ignore[attr-defined]


@dataclass
class Measured:
    way: str
    label: str
    request_bytes: int
    allocated_per_job: float
    logical_per_job: float


def measure(way: str, label: str, size: int, jobs: int) -> Measured:
    request = request_of(size)
    request_bytes = len(json.dumps(request, separators=(",", ":")))
    with RedisServer() as server, sending(send_full if way == "baseline" else None):
        settings = ClientSettings(redis_url=server.url, prefix=f"rb{uuid.uuid4().hex[:6]}")
        r = redis.Redis.from_url(server.url)
        with Client(settings=settings) as client:
            if way == "baseline":
                client._submitter._direct = None  # through Celery's publish, which ``send_full`` replaces
            client.submit(request_of(1_000))  # warm: scripts loaded, kombu's bindings made
            time.sleep(0.2)
            before = int(r.info("memory")["used_memory"])
            ids = [client.submit(request).id for _ in range(jobs)]
            after = int(r.info("memory")["used_memory"])
        envelopes = sum(r.hstrlen(settings.keys.job(i), "envelope") for i in ids)
        messages = sum(len(m) for name in queue_lists(settings) for m in r.lrange(name, 0, -1))
        r.close()
    return Measured(way, label, request_bytes, (after - before) / jobs, (envelopes + messages) / jobs)


def run(rounds: int) -> list[list[Measured]]:
    return [
        [measure(way, label, size, jobs) for label, size, jobs in SIZES for way in ("ticket", "baseline")]
        for _ in range(rounds)
    ]


def section(runs: list[list[Measured]], rounds: int, *, save_plot: bool = True) -> str:
    def med(way: str, label: str, attr: str) -> float:
        return float(
            statistics.median(
                getattr(m, attr) / m.request_bytes for r in runs for m in r if m.way == way and m.label == label
            )
        )

    small = [m for r in runs for m in r if m.way == "ticket" and m.label == SIZES[0][0]]
    fixed = statistics.median(m.logical_per_job - m.request_bytes for m in small)
    rows = []
    for label, _, jobs in SIZES:
        request = next(m.request_bytes for m in runs[0] if m.label == label)
        rows.append(
            f"| {label} ({request:,} B) | {jobs} | {med('ticket', label, 'allocated_per_job'):.2f}x |"
            f" {med('ticket', label, 'logical_per_job'):.2f}x | {med('baseline', label, 'allocated_per_job'):.2f}x |"
            f" {med('baseline', label, 'logical_per_job'):.2f}x |"
        )
    sizes = [next(m.request_bytes for m in runs[0] if m.label == label) for label, _, _ in SIZES]
    curves = {
        f"{way}, {attr.split('_')[0]}": (sizes, [med(way, label, attr) for label, _, _ in SIZES])
        for way in ("ticket", "baseline")
        for attr in ("allocated_per_job", "logical_per_job")
    }
    plot = line_plot(
        "request_bytes",
        "Redis bytes per queued job vs request size",
        ("request JSON bytes", "Redis bytes / request bytes"),
        curves,
        logx=True,
        goal=(1.1, "goal: 1.1x"),
        save=save_plot,
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"`python -m bench.request_bytes --rounds {rounds}` (`make bench-request-bytes`): jobs submitted with"
            " `Client.submit` to a private redis-server that no node consumes (so each stays queued); Redis bytes"
            " per queued job as a multiple of the request's JSON bytes. *Allocated*: `used_memory` grown over the"
            " jobs (allocator size classes included); *logical*: the record's envelope plus the broker message as"
            " stored. **ticket**: the message carries the job's id, the request is in the record alone (moonq now);"
            " **baseline**: the whole envelope in the message too, as moonq sent it before (same run, same server"
            f" build). Medians of {rounds} rounds, each on a fresh server.",
            "",
            "| request | jobs | ticket, allocated | ticket, logical | baseline, allocated | baseline, logical |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            *([plot, ""] if plot else []),
            f"The ticket leaves one copy of the request: its logical bytes are the request's own from 100 KB"
            f" up. What stays on top is fixed per job, about {fixed:,.0f} B logical (the broker message, mostly"
            " Celery's protocol headers, and the record's other fields), which is most of a 1 KB job; and,"
            " allocated, jemalloc's size classes (a large allocation is rounded up to the next of four steps"
            " per power of two: up to a quarter more).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    runs = run(args.rounds)
    text = section(runs, args.rounds, save_plot=not args.no_write)
    print(text)
    if not args.no_write:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
