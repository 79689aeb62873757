"""The ``moonq`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from console.render import Renderer
from moonq.errors import InvalidRequest, JobFailed, JobNotFound, JobTimeout, MoonqError
from producers.client import Client

DEFAULT_MODEL = "kimi-k2.5"


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        try:
            request = json.loads(text)
        except ValueError as err:
            raise InvalidRequest([("--file", f"is not valid JSON: {err}")]) from None
        if isinstance(request, dict) and args.model:
            request["model"] = args.model
        return request  # type: ignore[no-any-return]
    if not args.prompt:
        raise InvalidRequest([("prompt", "give a prompt, or --file with a request")])
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    request = {"model": args.model or DEFAULT_MODEL, "messages": messages}
    if args.max_tokens:
        request["max_completion_tokens"] = args.max_tokens
    return request


def _follow(client: Client, job_id: str, as_json: bool) -> int:
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


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    job = client.submit(_request_from_args(args), priority=args.priority, idempotency_key=args.idempotency_key)
    print(job.id if args.no_wait else f"[job {job.id}]", file=sys.stdout if args.no_wait else sys.stderr, flush=True)
    return 0 if args.no_wait else _follow(client, job.id, args.json)


def cmd_follow(client: Client, args: argparse.Namespace) -> int:
    return _follow(client, args.job, args.json)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    rec = client.job(args.job).record()
    shown: dict[str, Any] = {
        k: rec[k] for k in ("status", "model", "attempt", "enqueued_at", "started_at", "finished_at") if k in rec
    }
    if "error" in rec:
        shown["error"] = json.loads(rec["error"])
    print(json.dumps({"id": args.job, **shown}, indent=2))
    return 0


def cmd_result(client: Client, args: argparse.Namespace) -> int:
    print(client.job(args.job).result(timeout=args.timeout).model_dump_json(indent=2, exclude_none=True))
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    ended = client.job(args.job).cancel()
    print("cancel requested" if ended else "job had already ended")
    return 0


def cmd_batch(client: Client, args: argparse.Namespace) -> int:
    from console.batch import run_batch

    answered, failed = run_batch(client, Path(args.input), Path(args.output), window=args.window)
    print(f"{answered} line(s) answered, {failed} failed; output: {args.output}", file=sys.stderr)
    return 0


def cmd_failed(client: Client, args: argparse.Namespace) -> int:
    rows = client.failed(args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        err = row["error"]
        print(f"{row['id']}  {row['model']:<24} attempts={row['attempts']:<3} {err.get('type')}: {err.get('message')}")
    print(f"{len(rows)} failed job(s)", file=sys.stderr)
    return 0


def cmd_retry(client: Client, args: argparse.Namespace) -> int:
    job = client.retry(args.job)
    print(job.id)
    return 0


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    from console.top import run_top

    return run_top(client.settings, args.node, args.interval, once=args.once)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moonq", description="Chat-completion jobs on a Celery + Redis queue.")
    p.add_argument("--redis-url", help="overrides REDIS_URL")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a job and stream its answer")
    s.add_argument("prompt", nargs="?", help="the user message")
    s.add_argument("--file", help="a JSON chat-completions request ('-' = stdin)")
    s.add_argument("--model", help=f"model (default {DEFAULT_MODEL}; overrides the file's)")
    s.add_argument("--system", help="a system message")
    s.add_argument("--max-tokens", type=int, help="max_completion_tokens")
    s.add_argument("--priority", type=int, default=5, help="0 (most urgent) to 9; default 5")
    s.add_argument("--idempotency-key", help="the same key again returns the same job instead of a new run")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.add_argument("--json", action="store_true", help="print events as JSON lines")
    s.set_defaults(func=cmd_submit)
    for name, func, text in (("follow", cmd_follow, "stream a job's events"), ("status", cmd_status, "a job's state")):
        c = sub.add_parser(name, help=text)
        c.add_argument("job")
        if name == "follow":
            c.add_argument("--json", action="store_true", help="print events as JSON lines")
        c.set_defaults(func=func)
    r = sub.add_parser("result", help="wait for a job and print its completion")
    r.add_argument("job")
    r.add_argument("--timeout", type=float, default=None)
    r.set_defaults(func=cmd_result)
    c = sub.add_parser("cancel", help="cancel a job (queued: never runs; running: stream aborted)")
    c.add_argument("job")
    c.set_defaults(func=cmd_cancel)
    b = sub.add_parser("batch", help="run an OpenAI/Moonshot batch JSONL file; resumable")
    b.add_argument("input", help="JSONL: {custom_id, method, url, body} per line")
    b.add_argument("-o", "--output", required=True, help="JSONL answers; run again to resume")
    b.add_argument("--window", type=int, default=500, help="jobs in flight at most (default 500)")
    b.set_defaults(func=cmd_batch)
    f = sub.add_parser("failed", help="list failed jobs (dead letters), newest first")
    f.add_argument("--limit", type=int, default=100)
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_failed)
    c = sub.add_parser("retry", help="run a failed or cancelled job again as a new job; prints its id")
    c.add_argument("job")
    c.set_defaults(func=cmd_retry)
    t = sub.add_parser("top", help="live view of the fleet from the nodes' /metrics (no Grafana needed)")
    t.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="URL",
        help="a node's metrics URL, repeatable; added to the nodes announced in Redis",
    )
    t.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (default 2)")
    t.add_argument("--once", action="store_true", help="print one snapshot (two scrapes --interval apart) and exit")
    t.set_defaults(func=cmd_top)
    sub.add_parser(
        "simulate", help="run the local Moonshot API simulator (see `moonq simulate --help`)", add_help=False
    )
    sub.add_parser("demo", help="run the demo: private Redis, simulator, one worker, sample jobs")
    sub.add_parser("gateway", help="serve the HTTP gateway (see `moonq gateway --help`)", add_help=False)
    return p


def _gateway(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moonq gateway", description="The HTTP gateway (OpenAI-compatible + jobs API).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    from gateway.app import serve

    try:
        serve(args.host, args.port)
    except ValueError as err:  # e.g. no tokens configured
        print(f"moonq gateway: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # These two own their flags: hand them the rest of the line untouched.
    if argv[:1] == ["simulate"]:
        from simulator.cli import main as simulate

        return simulate(argv[1:])
    if argv[:1] == ["gateway"]:
        return _gateway(argv[1:])
    if argv[:1] == ["demo"]:
        from console.demo import main as demo

        return demo(argv[1:])
    args = _parser().parse_args(argv)
    try:
        with Client(args.redis_url) as client:
            return int(args.func(client, args))
    except InvalidRequest as err:
        print(f"moonq: invalid request: {err}", file=sys.stderr)
        return 2
    except JobNotFound as err:
        print(f"moonq: no such job: {err}", file=sys.stderr)
        return 3
    except (JobFailed, JobTimeout, MoonqError) as err:
        print(f"moonq: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
