"""Resume vs restart: tokens billed and time to the final answer at a 20% stream-fault rate, same run.

    python -m bench.resume [--jobs N] [--rounds R] [--fault-rate P]

Two nodes (embedded runtimes), one with ``MOONQ_RESUME=partial`` and one with ``restart``, each
streaming from its own simulator (same seed, same pacing: a first token after 0.3 s, then 1-3
tokens every 30 ms, answers of 150 to 300 tokens) for kimi-k2.5 with thinking off. Every job
carries a fault script drawn once and given to both modes alike: each attempt breaks with
probability P (``drop``, ``truncate`` or a ``stall`` past the node's read timeout, at a random
frame) until one attempt is let through. So
both modes meet the same breaks; only what they do about them differs. Per round and mode: the
tokens the simulator billed, input and output apart (a broken stream is charged what it had sent),
their cost at kimi-k2.5's list price, and each job's time from submit to its final answer. The report gives medians over
the rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path

from bench.report import write_section
from harness import RedisServer
from moonq.usage import DEFAULT_PRICES
from producers import Client
from simulator import SimConfig, SimServer
from worker.loop import Runtime
from worker.settings import Settings

SECTION = "## Resumed streams: Partial Mode vs starting over"
SIM = SimConfig(seed=14, first_token_latency_s=0.3, chunk_interval_s=0.03, answer_tokens=(150, 300))
READ_TIMEOUT_S = 1.0
STALL_S = 2.0
MODES = ("partial", "restart")
API_KEY = "sk-moonq-bench-resume"
# Jobs in flight at once: few enough that the node's own CPU does not decide the times measured.
BATCH = 30
MODEL = "kimi-k2.5"
PRICE = DEFAULT_PRICES[MODEL]  # USD per million tokens; cache hits are not discounted here


@dataclass
class Run:
    """One round of one mode."""

    input_tokens: int
    output_tokens: int
    requests: int
    latency_s: list[float]  # per job, submit to final answer
    broke: list[bool]  # per job: its script had at least one fault

    @property
    def faulted_latency_s(self) -> list[float]:
        return [lat for lat, broke in zip(self.latency_s, self.broke, strict=True) if broke]


def scripts(jobs: int, rate: float, rng: random.Random) -> list[list[str]]:
    """One fault script per job: each attempt breaks with probability ``rate``, the last is let through."""
    out = []
    for _ in range(jobs):
        script = []
        while rng.random() < rate:
            at = rng.randint(2, 100)
            kind = rng.choice(("drop", "truncate", "stall"))
            script.append(f"stall:{STALL_S}@{at}" if kind == "stall" else f"{kind}:{at}")
        out.append([*script, "ok"])
    return out


def run_mode(redis_url: str, sim: SimServer, mode: str, plan: list[list[str]]) -> Run:
    settings = Settings(
        redis_url=redis_url,
        prefix=f"br{uuid.uuid4().hex[:6]}",
        moonshot_base_url=sim.base_url,
        moonshot_api_key=API_KEY,
        resume=mode,
        read_timeout_s=READ_TIMEOUT_S,
        backoff_base_s=0.05,
        max_retry_delay_s=0.2,
        metrics_port=0,
    )
    sim.reset()
    rt = Runtime(settings).start()
    try:
        latency = []
        with Client(settings=settings) as client:
            for start in range(0, len(plan), BATCH):
                jobs = []
                for i, script in enumerate(plan[start : start + BATCH], start):
                    messages = [{"role": "user", "content": f"Tell me about rivers, part {i}."}]
                    sim_field = {"script": script, "key": uuid.uuid4().hex}
                    request = {"model": MODEL, "thinking": {"type": "disabled"}, "temperature": 0.6}
                    jobs.append(client.submit({**request, "messages": messages, "sim": sim_field}))
                futures = [rt.submit(json.loads(job.record()["envelope"])) for job in jobs]
                wait(futures)
                assert [f.result() for f in futures] == ["succeeded"] * len(jobs)
                for job in jobs:
                    record = job.record()
                    latency.append(float(record["finished_at"]) - float(record["enqueued_at"]))
    finally:
        rt.stop()
    admitted = sim.stats()["admitted"]
    prompt = sum(int(a["prompt_tokens"]) for a in admitted)
    total = sum(int(a["charged_tokens"] or 0) for a in admitted)
    return Run(prompt, total - prompt, len(admitted), latency, [len(script) > 1 for script in plan])


def cost_usd(run: Run) -> float:
    return (run.input_tokens * PRICE.input_cache_miss + run.output_tokens * PRICE.output) / 1_000_000


def measure(jobs: int, rounds: int, rate: float) -> dict[str, list[Run]]:
    rng = random.Random(14)
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    with RedisServer() as redis, SimServer(SIM) as partial_sim, SimServer(SIM) as restart_sim:
        sims = {"partial": partial_sim, "restart": restart_sim}
        for round_ in range(rounds):
            plan = scripts(jobs, rate, rng)
            order = MODES if round_ % 2 == 0 else MODES[::-1]  # neither mode always goes first
            for mode in order:
                runs[mode].append(run_mode(redis.url, sims[mode], mode, plan))
                last = runs[mode][-1]
                print(
                    f"round {round_ + 1} {mode:8s}: billed {last.input_tokens:,} in + {last.output_tokens:,} out"
                    f" tokens in {last.requests} requests,"
                    f" median {statistics.median(last.latency_s):.2f} s"
                    f" (faulted jobs {statistics.median(last.faulted_latency_s or [0]):.2f} s)"
                )
    return runs


def saved_s(partial: list[Run], restart: list[Run]) -> float:
    """Median over rounds of the median, over the jobs that met a break, of restart's time minus resume's."""
    per_round = []
    for p, r in zip(partial, restart, strict=True):
        diffs = [b - a for a, b, broke in zip(p.latency_s, r.latency_s, p.broke, strict=True) if broke]
        per_round.append(statistics.median(diffs) if diffs else 0.0)
    return statistics.median(per_round)


def summary(runs: list[Run], jobs: int) -> dict[str, float]:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    return {
        "input": med([r.input_tokens for r in runs]),
        "output": med([r.output_tokens for r in runs]),
        "billed": med([r.input_tokens + r.output_tokens for r in runs]),
        "cost": med([cost_usd(r) for r in runs]),
        "requests": med([r.requests for r in runs]),
        "latency": med([med(r.latency_s) for r in runs]),
        "p90": med([statistics.quantiles(r.latency_s, n=10)[-1] for r in runs]),
        "faulted": med([med(r.faulted_latency_s) for r in runs]),
        "faulted_jobs": med([len(r.faulted_latency_s) for r in runs]),
    }


def section(runs: dict[str, list[Run]], jobs: int, rounds: int, rate: float) -> str:
    s = {mode: summary(runs[mode], jobs) for mode in MODES}

    def less(key: str) -> str:
        ratio = 1 - s["partial"][key] / s["restart"][key] if s["restart"][key] else 0.0
        return f"{abs(ratio):.1%} {'less' if ratio >= 0 else 'more'}"

    rows: list[tuple[str, Callable[[str], str]]] = [
        ("input tokens billed per round", lambda m: f"{s[m]['input']:,.0f}"),
        ("output tokens billed per round", lambda m: f"{s[m]['output']:,.0f}"),
        ("all tokens billed per round", lambda m: f"{s[m]['billed']:,.0f}"),
        (f"cost per round at {MODEL}'s list price", lambda m: f"${s[m]['cost']:.4f}"),
        ("upstream requests per round", lambda m: f"{s[m]['requests']:,.0f}"),
        ("time to final answer, median", lambda m: f"{s[m]['latency']:.2f} s"),
        ("time to final answer, p90", lambda m: f"{s[m]['p90']:.2f} s"),
        (
            "time to final answer, median of the jobs that met a break",
            lambda m: f"{s[m]['faulted']:.2f} s ({s[m]['faulted_jobs']:.0f} jobs)",
        ),
    ]
    gain = saved_s(runs["partial"], runs["restart"])
    table = [f"| {name} | {fmt('partial')} | {fmt('restart')} |" for name, fmt in rows]
    return "\n".join(
        [
            SECTION,
            "",
            f"`make bench-resume` (`.venv/bin/python -m bench.resume --jobs {jobs} --rounds {rounds}`),"
            f" {time.strftime('%Y-%m-%d')}, machine as above. Two embedded nodes, `MOONQ_RESUME=partial` and"
            f" `restart`, each on its own simulator (same seed; {MODEL} with thinking off; first token after"
            f" 0.3 s, then 1-3 tokens every 30 ms; answers of 150-300 tokens). Each round {jobs} jobs run on both"
            f" ({BATCH} at a time), every job with the same fault"
            f" script in both modes: each attempt breaks with probability {rate:.0%} (`drop`, `truncate`, or a"
            f" {STALL_S:g} s `stall` past the {READ_TIMEOUT_S:g} s read timeout, at a random frame) until one gets"
            f" through. Billed = the simulator's charge: every request's prompt and completion, a broken stream"
            f" charged the tokens it had sent (what Moonshot bills for one is not documented). Cost at"
            f" ${PRICE.input_cache_miss:.2f} per million input and ${PRICE.output:.2f} per million output tokens,"
            f" cache hits not discounted. Medians over {rounds} rounds.",
            "",
            "| | resume (Partial Mode) | restart |",
            "|---|---|---|",
            *table,
            "",
            f"Resuming billed {less('output')} output and {less('billed')} tokens in all, for {less('cost')}"
            f" money; the jobs that met a break had their answer after {s['partial']['faulted']:.2f} s against"
            f" {s['restart']['faulted']:.2f} s (median), {gain:.2f} s sooner job for job (median of the paired"
            " differences). A continuation sends the text already generated back as"
            " prompt (input, cheaper than output, and partly a cache hit) and generates only what is missing,"
            " where starting over generates that text again as output: the same number of tokens can cost"
            " less, and the missing part arrives sooner. Jobs without a break are alike in both modes.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    args = parser.parse_args()
    runs = measure(args.jobs, args.rounds, args.fault_rate)
    text = section(runs, args.jobs, args.rounds, args.fault_rate)
    print(text)
    write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
