"""The ``moonq`` console: click's parsing (help, usage errors, exit codes, completion) and rich output.

The job subcommands end to end are in test_pipeline.py, batch in test_batch.py, top in
test_top.py, the demo in test_processes.py; here: what every subcommand shares, and the parts
that draw (plain text off a terminal, styles only on one).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from rich.console import Console

from console.batch import Progress
from console.cli import main
from console.render import Renderer
from console.top import table
from moonq.keys import Keys
from moonq.record import JobField, JobStatus, new_record
from moonq.wire import Event
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

# Every subcommand and the options its --help must name.
OPTIONS = {
    "submit": [
        "--file",
        "--model",
        "--system",
        "--max-tokens",
        "--priority",
        "--idempotency-key",
        "--no-wait",
        "--json",
        "PROMPT",
    ],
    "follow": ["--json", "JOB"],
    "status": ["JOB"],
    "result": ["--timeout", "JOB"],
    "cancel": ["JOB"],
    "batch": ["-o, --output", "--window", "INPUT"],
    "failed": ["--limit", "--json"],
    "retry": ["JOB"],
    "top": ["--node URL", "--interval", "--once"],
    "gateway": ["--host", "--port"],
    "demo": ["--help"],
}


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_subcommand_has_help_naming_its_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: moonq {command} ")
    for option in OPTIONS[command]:
        assert option in out, (option, out)


def test_the_group_help_lists_every_subcommand_and_how_to_enable_completion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "--redis-url" in out and "_MOONQ_COMPLETE=bash_source moonq" in out
    for command in [*OPTIONS, "simulate"]:
        assert f"\n  {command} " in out, command


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "--bogus"],
        ["top", "--interval", "soon"],
        ["batch", "in.jsonl"],  # -o is required
        ["status"],  # JOB is required
        ["nosuchcommand"],
        [],
    ],
)
def test_a_usage_error_exits_2_with_clicks_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Usage: moonq" in err and ("Error:" in err or not argv)


def test_simulate_and_gateway_keep_their_own_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("MOONQ_GATEWAY")]:
        monkeypatch.delenv(name)
    assert main(["simulate", "--help"]) == 0
    assert main(["simulate", "--port", "0", "--fault-rate", "2"]) == 2  # the simulator's own check
    assert main(["simulate", "--no-such-flag"]) == 2
    # Parsed, then refused for want of tokens (before anything listens).
    assert main(["gateway", "--host", "127.0.0.1", "--port", "0"]) == 2


def moonq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "console.cli", *args],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_shell_completion_answers_through_MOONQ_COMPLETE() -> None:
    done = moonq(env={"_MOONQ_COMPLETE": "bash_complete", "COMP_WORDS": "moonq su", "COMP_CWORD": "1"})
    assert done.returncode == 0 and "plain,submit" in done.stdout.splitlines(), done.stdout + done.stderr
    done = moonq(env={"_MOONQ_COMPLETE": "bash_complete", "COMP_WORDS": "moonq top --i", "COMP_CWORD": "2"})
    assert "plain,--interval" in done.stdout.splitlines()


def test_status_of_an_unknown_job_exits_3(fresh_prefix: Settings) -> None:
    done = moonq(
        "--redis-url", fresh_prefix.redis_url, "status", "no-such-job", env={"MOONQ_PREFIX": fresh_prefix.prefix}
    )
    assert done.returncode == 3 and "moonq: no such job: no-such-job" in done.stderr and not done.stdout


def test_status_shows_the_record_as_stored(
    fresh_prefix: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = str(uuid.uuid4())
    record = new_record(model="kimi-k2.5", enqueued_at=time.time(), priority=5, envelope_json="{}")
    error = {"type": "quota", "message": "out of credit", "status": 429}
    record |= {
        JobField.STATUS: JobStatus.FAILED,
        JobField.ATTEMPT: "2",
        JobField.FINISHED_AT: "1700000000.5",
        JobField.ERROR: json.dumps(error),
    }
    r = redis.Redis.from_url(fresh_prefix.redis_url)
    for name, value in record.items():
        r.hset(Keys(fresh_prefix.prefix).job(job_id), name, value)
    monkeypatch.setenv("MOONQ_PREFIX", fresh_prefix.prefix)
    assert main(["--redis-url", fresh_prefix.redis_url, "status", job_id]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "id": job_id,
        "status": "failed",
        "model": "kimi-k2.5",
        "attempt": "2",
        "enqueued_at": record[JobField.ENQUEUED_AT],
        "finished_at": "1700000000.5",
        "error": error,
    }


def events(*items: dict[str, object]) -> list[Event]:
    return [Event.model_validate({"job_id": "j", "seq": n, **item}) for n, item in enumerate(items, 1)]


STREAM = events(
    {"type": "delta", "index": 0, "delta": {"reasoning_content": "think\tabout it"}},
    {"type": "delta", "index": 0, "delta": {"content": "Hello,\tworld " + "x" * 200 + " "}},
    {"type": "failed", "error": {"type": "quota", "message": "no credit"}},
)


def test_the_renderer_writes_the_text_exactly_and_styles_only_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    plain, styled = io.StringIO(), FakeTTY()
    for out in (plain, styled):
        renderer = Renderer(out)
        for event in STREAM:
            renderer.event(event)
    text = "thinking: think\tabout it\nHello,\tworld " + "x" * 200 + " \n[failed: quota: no credit]\n"
    assert plain.getvalue() == text  # no wrapping, tabs kept, no escape codes
    assert "\x1b[" in styled.getvalue() and "Hello,\tworld " + "x" * 200 + " \n" in styled.getvalue()
    forced = io.StringIO()
    Renderer(forced, color=True).event(STREAM[2])
    assert forced.getvalue().startswith("\x1b[")


def test_batch_progress_is_a_plain_line_off_a_terminal_and_a_rich_bar_on_one() -> None:
    log = io.StringIO()
    with Progress(3, log) as progress:
        for ok in (True, False, True):
            progress.add(ok)
    assert (progress.done, progress.failed) == (3, 1)
    last = log.getvalue().splitlines()[-1]
    assert last.startswith(f"[{'#' * 30}] 3/3 ") and " ETA 00:00 failed 1" in last and "\x1b" not in log.getvalue()
    tty = FakeTTY()
    with Progress(2, tty) as progress:
        progress.add(True)
        progress.add(False)
    drawn = tty.getvalue()
    assert "2/2" in drawn and "ETA" in drawn and "failed 1" in drawn and "/s" in drawn


def test_top_live_table_shows_every_row() -> None:
    rows = [("moonq top", "12:00:00   last 2.0 s"), ("nodes", "1 up / 2 known"), ("down", "http://x/metrics")]
    out = io.StringIO()
    Console(file=out, width=100).print(table([*rows, ("", "redis: no answer")]))
    text = out.getvalue()
    assert "moonq top  12:00:00   last 2.0 s" in text and "redis: no answer" in text
    for label, value in rows[1:]:
        assert label in text and value in text
