"""``moonq batch`` memory: a 50,000-line file in bounded memory, beside a file a tenth its size.

    python -m bench.batch [--lines 5000,50000] [--baseline REV]

For each size, a batch file of that many lines goes through ``moonq batch IN -o OUT`` (the CLI,
its own process) to one ``celery -A worker worker`` node and a zero-latency simulator (its own
process). The batch process's RSS is sampled every 0.2 s; its peak (``VmHWM``) and the time are
reported, with the input file's size for scale. Bounded memory shows as the same peak for both
sizes, where reading the file (or keeping every answer) would grow with it. With ``--baseline
REV``, the same sizes also go through the CLI with ``console/batch.py`` as it was at git revision
REV, in the same run.
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
SECTION = "## Batch files: memory of `moonq batch` as the file grows"
# ``moonq batch`` with console/batch.py of a git revision (argv: REV, then the CLI's arguments): the CLI
# imports console.batch when it runs a batch, so the older module put in its place first is the one used.
BASELINE_CLI = """
import subprocess, sys, types
rev = sys.argv[1]
source = subprocess.check_output(["git", "show", rev + ":console/batch.py"], text=True)
module = types.ModuleType("console.batch")
sys.modules["console.batch"] = module
exec(compile(source, rev + ":console/batch.py", "exec"), module.__dict__)
from console.cli import main
sys.exit(main(sys.argv[2:]))
"""


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
    version: str
    lines: int
    input_mib: float
    seconds: float
    peak_rss_kib: int
    rss_at_half_kib: int
    answered: int
    ok: int


def run(lines: int, workdir: Path, baseline: str | None = None) -> Run:
    version = baseline or "now"
    src, dst = workdir / f"in-{lines}.jsonl", workdir / f"out-{version}-{lines}.jsonl"
    if not src.exists():
        write_input(src, lines)
    with (
        RedisServer() as redis_server,
        Sim(latency_ms=0, chunk_ms=0, answer=(8, 8), per_chunk=4) as sim,
        Node(redis_server.url, sim.base_url, workdir, None),
    ):
        env = clean_env({"REDIS_URL": redis_server.url, "MOONQ_PREFIX": PREFIX})
        cmd = [str(Path(sys.executable).parent / "moonq"), "batch", str(src), "-o", str(dst)]
        if baseline:
            cmd = [sys.executable, "-c", BASELINE_CLI, baseline, *cmd[1:]]
        t0 = time.monotonic()
        with open(workdir / f"batch-{version}-{lines}.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = half = 0
        while proc.poll() is None:
            peak = max(peak, status_kib(proc.pid, "VmHWM"))
            if not half and dst.exists() and dst.stat().st_size and _count(dst) >= lines // 2:
                half = status_kib(proc.pid, "VmRSS")
            time.sleep(0.2)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            tail = (workdir / f"batch-{version}-{lines}.log").read_text()[-2000:]
            raise RuntimeError(f"moonq batch exited {proc.returncode}: {tail}")
    answers = [json.loads(line) for line in dst.open()]
    ok = sum(1 for a in answers if a["error"] is None and a["response"]["status_code"] == 200)
    return Run(version, lines, src.stat().st_size / 2**20, seconds, peak, half, len(answers), ok)


def _count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def section(runs: list[Run], cmd: str, total_s: float) -> str:
    lines = [
        SECTION,
        "",
        f"`{cmd}`, {time.strftime('%Y-%m-%d')}; the whole run took {total_s:.0f} s. Machine as above. Each file"
        " goes through `moonq batch IN -o OUT` (its own process, default window of 500 jobs in flight) to"
        " one node and a zero-latency simulator; the batch process's RSS is sampled every 0.2 s.",
        "",
        "| `console/batch.py` | lines | input file | answered (ok) | time | lines/s | peak RSS of `moonq batch` |"
        " RSS at half-way |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r.version} | {r.lines:,} | {r.input_mib:.1f} MiB | {r.answered:,} ({r.ok:,}) | {r.seconds:.0f} s |"
            f" {r.lines / r.seconds:.0f} | {r.peak_rss_kib / 1024:.1f} MiB | {r.rss_at_half_kib / 1024:.1f} MiB |"
            for r in runs
        ),
        "",
    ]
    for version in dict.fromkeys(r.version for r in runs):
        mine = [r for r in runs if r.version == version]
        small, big = mine[0], mine[-1]
        grew = big.peak_rss_kib - small.peak_rss_kib
        lines.append(
            f"- {version}: {big.lines / small.lines:.0f}x the lines,"
            f" {big.peak_rss_kib / max(small.peak_rss_kib, 1):.2f}x the peak memory"
            f" ({grew / 1024:+.1f} MiB for {big.lines - small.lines:,} more lines,"
            f" {grew * 1024 / max(big.lines - small.lines, 1):.0f} bytes a line)."
        )
    lines += [
        "",
        "Both input and output are streamed and at most the window's jobs are pending. Before, the process kept"
        " every custom id in a Python set (to skip duplicates and the lines a resumed run had answered): its"
        " growth above, about 1 GB for 10 million lines. Now that set is a Redis set of the run's own (loaded"
        " from the output file at start, deleted at the end), and lines are enqueued with `submit_many` in"
        " chunks, each with its idempotency key.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", default="5000,50000")
    parser.add_argument("--baseline", help="a git revision whose console/batch.py to measure beside today's")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moonq-batch-bench-"))
    t0 = time.monotonic()
    runs = []
    for version in [args.baseline, None] if args.baseline else [None]:
        for n in (int(x) for x in args.lines.split(",")):
            runs.append(run(n, workdir, version))
            r = runs[-1]
            print(
                f"  {r.version} {n:,} lines: {r.seconds:.0f} s, peak RSS {r.peak_rss_kib / 1024:.1f} MiB, ok {r.ok:,}",
                flush=True,
            )
    cmd = f".venv/bin/python -m bench.batch --lines {args.lines}" + (
        f" --baseline {args.baseline}" if args.baseline else ""
    )
    text = section(runs, cmd, time.monotonic() - t0)
    print(text)
    write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
