"""``moonq demo``: the whole path on embedded defaults, then everything it started is stopped.

A private redis-server when ``REDIS_URL`` is unset, the simulator when ``MOONSHOT_API_KEY``
is unset, one worker node started as users start it (``celery -A worker worker``), and
sample jobs for plain chat, a tool call, Partial Mode and a thinking model, streamed live.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producers.client import Client
from producers.local import RedisServer
from producers.render import BOLD, RESET, Renderer

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
    partial = {"role": "assistant", "content": "Once upon a time, in a lighthouse,", "partial": True}
    return [
        Sample("Plain chat (kimi-k2.5, thinking off)", {
            "model": "kimi-k2.5", "thinking": {"type": "disabled"}, "temperature": 0.6,
            "messages": [{"role": "system", "content": "You are Kimi."},
                         {"role": "user", "content": "Say hello to a new moonq user."}],
        }),
        Sample("Tool call (kimi-k2.5 offered get_weather)", {
            "model": "kimi-k2.5", "thinking": {"type": "disabled"}, "temperature": 0.6,
            "messages": [user], "tools": [WEATHER_TOOL],
        }),
        Sample("Partial Mode (the model continues the prefix)", {
            "model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Tell a very short story."}, partial],
        }, prefix=partial["content"]),
        Sample("Thinking model (reasoning_content, then the answer)", {
            "model": "kimi-k2-thinking", "max_completion_tokens": 2048,
            "messages": [{"role": "user", "content": "Is 1001 a prime number?"}],
        }),
    ]


@contextmanager
def _worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.terminate()  # SIGTERM: Celery's warm shutdown
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


def run(out: Any = sys.stdout) -> int:
    with ExitStack() as stack:
        env, notes = _environment(stack)
        log_path = Path(tempfile.mkdtemp(prefix="moonq-demo-")) / "worker.log"
        stack.enter_context(_worker(env, log_path))
        notes.append(f"one worker node: celery -A worker worker (log: {log_path})")
        for note in notes:
            print(f"• {note}", file=out)
        client = stack.enter_context(Client(env["REDIS_URL"]))
        rows = []
        for sample in samples():
            print(f"\n{BOLD}── {sample.title}{RESET}", file=out)
            submitted = time.monotonic()
            job = client.submit(sample.request)
            renderer = Renderer(out)
            first: float | None = None
            if sample.prefix:
                out.write(sample.prefix)
            for event in job.events():
                if event.type == "delta" and first is None:
                    first = time.monotonic() - submitted
                renderer.event(event)
            rec = job.record()
            usage = job.result().usage if rec["status"] == "succeeded" else None
            rows.append((sample.title.split(" (")[0], rec["status"], usage, first, time.monotonic() - submitted))
        _summary(rows, out)
        return 0 if all(r[1] == "succeeded" for r in rows) else 1


def _summary(rows: list[tuple[str, str, Any, float | None, float]], out: Any) -> None:
    print(f"\n{BOLD}── Summary{RESET}", file=out)
    print(f"{'job':<22}{'outcome':<11}{'prompt':>8}{'compl.':>8}{'first delta':>13}{'total':>9}", file=out)
    prompt = completion = 0
    for title, status, usage, first, total in rows:
        p, c = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        prompt, completion = prompt + p, completion + c
        ttft = f"{first * 1000:.0f} ms" if first is not None else "-"
        print(f"{title:<22}{status:<11}{p:>8}{c:>8}{ttft:>13}{total * 1000:>6.0f} ms", file=out)
    print(f"{len(rows)} jobs, {prompt} prompt + {completion} completion tokens", file=out)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="moonq demo", description=__doc__).parse_args(argv)
    try:
        return run()
    except RuntimeError as err:  # e.g. redis-server missing: say what to do, no traceback
        print(f"moonq demo: {err}", file=sys.stderr)
        return 2
