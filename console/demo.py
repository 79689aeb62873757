"""``moonq demo``: the whole path on embedded defaults, then everything it started is stopped.

A private redis-server when ``REDIS_URL`` is unset, the simulator when ``MOONSHOT_API_KEY``
is unset, one worker node started as users start it (``celery -A worker worker``), and
sample jobs for plain chat, a tool call, Partial Mode and a thinking model, streamed live.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from console.render import Renderer
from harness import RedisServer, WorkerProcess
from moonq.record import JobStatus
from producers.client import Client, Job

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@dataclass
class Sample:
    title: str
    request: dict[str, Any]
    prefix: str = ""  # Partial Mode: the API does not repeat it, so the demo prints it first


def samples() -> list[Sample]:
    user = {"role": "user", "content": "What is the weather in Beijing today?"}
    prefix = "Once upon a time, in a lighthouse,"
    partial = {"role": "assistant", "content": prefix, "partial": True}
    return [
        Sample(
            "Plain chat (kimi-k2.5, thinking off)",
            {
                "model": "kimi-k2.5",
                "thinking": {"type": "disabled"},
                "temperature": 0.6,
                "messages": [
                    {"role": "system", "content": "You are Kimi."},
                    {"role": "user", "content": "Say hello to a new moonq user."},
                ],
            },
        ),
        Sample(
            "Tool call (kimi-k2.5 offered get_weather)",
            {
                "model": "kimi-k2.5",
                "thinking": {"type": "disabled"},
                "temperature": 0.6,
                "messages": [user],
                "tools": [WEATHER_TOOL],
            },
        ),
        Sample(
            "Partial Mode (the model continues the prefix)",
            {
                "model": "moonshot-v1-8k",
                "messages": [{"role": "user", "content": "Tell a very short story."}, partial],
            },
            prefix=prefix,
        ),
        Sample(
            "Thinking model (reasoning_content, then the answer)",
            {
                "model": "kimi-k2-thinking",
                "max_completion_tokens": 2048,
                "messages": [{"role": "user", "content": "Is 1001 a prime number?"}],
            },
        ),
    ]


def _environment(stack: ExitStack) -> tuple[dict[str, str], list[str]]:
    env = dict(os.environ)
    notes = []
    if not env.get("REDIS_URL"):
        redis_server = stack.enter_context(RedisServer())
        env["REDIS_URL"] = redis_server.url
        notes.append(f"private redis-server at {redis_server.url}")
    if not env.get("MOONSHOT_API_KEY"):
        from simulator import SimConfig, SimServer

        sim = stack.enter_context(SimServer(SimConfig(seed=7, first_token_latency_s=0.25, chunk_interval_s=0.04)))
        env["MOONSHOT_BASE_URL"] = sim.base_url
        env["MOONSHOT_API_KEY"] = "sk-moonq-demo-simulator"
        notes.append(f"simulator at {sim.base_url} (MOONSHOT_API_KEY is unset)")
    else:
        notes.append(f"the real API at {env.get('MOONSHOT_BASE_URL', 'https://api.moonshot.ai/v1')}")
    return env, notes


def run(out: TextIO | None = None) -> int:
    """Start what is missing, run the samples (streamed to ``out``), print a summary; 0 if all succeeded."""
    out = out or sys.stdout
    # rich styles the headings and draws the summary; the answers themselves stream through Renderer.
    console = Console(file=out, highlight=False)
    with ExitStack() as stack:
        env, notes = _environment(stack)
        # Named after this process, so its worker can be told from any other on the machine.
        node = stack.enter_context(WorkerProcess(env, args=("-n", f"moonq-demo-{os.getpid()}@%h")))
        notes.append(f"one worker node: celery -A worker worker (log: {node.log_path})")
        for note in notes:
            console.print(Text(f"• {note}"), soft_wrap=True)
        client = stack.enter_context(Client(env["REDIS_URL"]))
        rows = []
        for sample in samples():
            _heading(console, sample.title)
            rows.append(_run_sample(client, sample.title.split(" (")[0], sample.request, sample.prefix, out))
            result = client.job(rows[-1].job_id).result() if rows[-1].status == JobStatus.SUCCEEDED else None
            if result is not None and result.choices[0].finish_reason == "tool_calls":
                # Answer the call the way an application would, and let the model finish.
                reply = _tool_reply(sample.request, result)
                console.print(Text('   tool result sent back: {"temp_c": 21, "sky": "clear"}', style="bold"))
                rows.append(_run_sample(client, "Tool result turn", reply, "", out))
        _summary(rows, console)
        return 0 if all(r.status == JobStatus.SUCCEEDED for r in rows) else 1


def _heading(console: Console, title: str) -> None:
    console.print()
    console.rule(Text(title, style="bold"), align="left")


@dataclass
class Row:
    job_id: str
    title: str
    status: str
    usage: Any
    first_delta_s: float | None
    total_s: float


def _run_sample(client: Client, title: str, request: dict[str, Any], prefix: str, out: Any) -> Row:
    submitted = time.monotonic()
    job: Job = client.submit(request)
    renderer = Renderer(out)
    first: float | None = None
    out.write(prefix)
    for event in job.events():
        if event.type == "delta" and first is None:
            first = time.monotonic() - submitted
        renderer.event(event)
    status = job.status()
    usage = job.result().usage if status == JobStatus.SUCCEEDED else None
    return Row(job.id, title, status, usage, first, time.monotonic() - submitted)


def _tool_reply(request: dict[str, Any], result: Any) -> dict[str, Any]:
    assistant = result.choices[0].message.model_dump(exclude_none=True)
    tools = [
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'}
        for call in result.choices[0].message.tool_calls or []
    ]
    return {**request, "messages": [*request["messages"], assistant, *tools]}


def _summary(rows: list[Row], console: Console) -> None:
    """A table of the jobs (outcome, tokens, time to first delta, total), then the totals."""
    _heading(console, "Summary")
    grid = Table(box=None, header_style="bold")
    grid.add_column("job", no_wrap=True)
    grid.add_column("outcome", no_wrap=True)
    for name in ("prompt", "compl.", "first delta", "total"):
        grid.add_column(name, justify="right", no_wrap=True)
    prompt = completion = 0
    latencies = []
    for row in rows:
        p, c = (row.usage.prompt_tokens, row.usage.completion_tokens) if row.usage else (0, 0)
        prompt, completion = prompt + p, completion + c
        latencies.append(row.total_s)
        ttft = f"{row.first_delta_s * 1000:.0f} ms" if row.first_delta_s is not None else "-"
        grid.add_row(row.title, row.status, str(p), str(c), ttft, f"{row.total_s * 1000:.0f} ms")
    console.print(grid)
    latencies.sort()
    console.print(
        Text(
            f"{len(rows)} jobs, {prompt} prompt + {completion} completion tokens;"
            f" latency (submit → last event) median {latencies[len(latencies) // 2] * 1000:.0f} ms,"
            f" max {latencies[-1] * 1000:.0f} ms"
        ),
        soft_wrap=True,
    )


def main() -> int:
    """``moonq demo``: run it; a missing prerequisite (e.g. redis-server) is one line on stderr, exit 2."""
    try:
        return run()
    except RuntimeError as err:  # e.g. redis-server missing: say what to do, no traceback
        print(f"moonq demo: {err}", file=sys.stderr)
        return 2
