"""``moonq batch`` memory: a 50,000-line file in bounded memory, beside a file a tenth its size.

    python -m bench.batch [--lines 5000,50000]

For each size, a batch file of that many lines goes through ``moonq batch IN -o OUT`` (the CLI,
its own process) to one ``celery -A worker worker`` node and a zero-latency simulator (its own
process). The batch process's RSS is sampled every 0.2 s; its peak (``VmHWM``) and the time are
reported, with the input file's size for scale. Bounded memory shows as the same peak for both
sizes, where reading the file (or keeping every answer) would grow with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fleets import clean_env
from bench.perf import PREFIX, Node, Sim, status_kib
from bench.report import write_section
from harness import RedisServer

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Batch files: memory of `moonq batch` on a 50,000-line file"


def write_input(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for i in range(lines):
            messages = [
                {"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": f"Line {i}: name one use of a message queue."},
            ]
            body = {"model": "moonshot-v1-8k", "max_tokens": 16, "messages": messages}
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(line) + "\n")


@dataclass
class Run:
    lines: int
    input_mib: float
    seconds: float
    peak_rss_kib: int
    rss_at_half_kib: int
    answered: int
    ok: int


def run(lines: int, workdir: Path) -> Run:
    src, dst = workdir / f"in-{lines}.jsonl", workdir / f"out-{lines}.jsonl"
    write_input(src, lines)
    with (
        RedisServer() as redis_server,
        Sim(latency_ms=0, chunk_ms=0, answer=(8, 8), per_chunk=4) as sim,
        Node(redis_server.url, sim.base_url, workdir, None),
    ):
        env = clean_env({"REDIS_URL": redis_server.url, "MOONQ_PREFIX": PREFIX})
        cmd = [str(Path(sys.executable).parent / "moonq"), "batch", str(src), "-o", str(dst)]
        t0 = time.monotonic()
        with open(workdir / f"batch-{lines}.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = half = 0
        while proc.poll() is None:
            peak = max(peak, status_kib(proc.pid, "VmHWM"))
            if not half and dst.exists() and dst.stat().st_size and _count(dst) >= lines // 2:
                half = status_kib(proc.pid, "VmRSS")
            time.sleep(0.2)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            tail = (workdir / f"batch-{lines}.log").read_text()[-2000:]
            raise RuntimeError(f"moonq batch exited {proc.returncode}: {tail}")
    answers = [json.loads(line) for line in dst.open()]
    ok = sum(1 for a in answers if a["error"] is None and a["response"]["status_code"] == 200)
    return Run(lines, src.stat().st_size / 2**20, seconds, peak, half, len(answers), ok)


def _count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def section(runs: list[Run], cmd: str, total_s: float) -> str:
    small, big = runs[0], runs[-1]
    lines = [
        SECTION,
        "",
        f"`{cmd}`, {time.strftime('%Y-%m-%d')}; the whole run took {total_s:.0f} s. Machine as above. Each file"
        " goes through `moonq batch IN -o OUT` (its own process, default window of 500 jobs in flight) to"
        " one node and a zero-latency simulator; the batch process's RSS is sampled every 0.2 s.",
        "",
        "| lines | input file | answered (ok) | time | lines/s | peak RSS of `moonq batch` | RSS at half-way |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r.lines:,} | {r.input_mib:.1f} MiB | {r.answered:,} ({r.ok:,}) | {r.seconds:.0f} s |"
            f" {r.lines / r.seconds:.0f} | {r.peak_rss_kib / 1024:.1f} MiB | {r.rss_at_half_kib / 1024:.1f} MiB |"
            for r in runs
        ),
        "",
        f"{big.lines / small.lines:.0f}x the lines,"
        f" {big.peak_rss_kib / max(small.peak_rss_kib, 1):.2f}x the peak memory"
        f" (+{(big.peak_rss_kib - small.peak_rss_kib) / 1024:.1f} MiB for {big.lines - small.lines:,} more lines,"
        f" {(big.peak_rss_kib - small.peak_rss_kib) * 1024 / max(big.lines - small.lines, 1):.0f} bytes a line:"
        " the set of custom ids it keeps to skip duplicates and answered lines); both input and output are"
        " streamed and at most the window's jobs are pending.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", default="5000,50000")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moonq-batch-bench-"))
    t0 = time.monotonic()
    runs = []
    for n in (int(x) for x in args.lines.split(",")):
        runs.append(run(n, workdir))
        r = runs[-1]
        print(f"  {n:,} lines: {r.seconds:.0f} s, peak RSS {r.peak_rss_kib / 1024:.1f} MiB, ok {r.ok:,}", flush=True)
    text = section(runs, f".venv/bin/python -m bench.batch --lines {args.lines}", time.monotonic() - t0)
    print(text)
    write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
