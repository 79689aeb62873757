"""The ``moonq`` command line (click): parses the line, runs a subcommand, returns its exit code.

Exit codes: 0 done; 1 the job failed, timed out, or another moonq error; 2 a usage error or an
invalid request; 3 no such job; 130 cancelled or interrupted. ``console/commands.py`` holds what
the job subcommands do; ``simulate`` hands its arguments to the simulator's own parser.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from console import commands
from moonq.errors import InvalidRequest, JobFailed, JobNotFound, JobTimeout, MoonqError
from producers.client import Client

PROG = "moonq"
COMPLETE_VAR = "_MOONQ_COMPLETE"


def _run(action: Callable[[Client], int]) -> int:
    """``action`` on a client for the group's ``--redis-url``, SDK errors turned into exit codes."""
    params = click.get_current_context().find_root().params
    redis_url: str | None = params.get("redis_url")
    try:
        with Client(redis_url, tenant=params.get("tenant")) as client:
            return action(client)
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


@click.group(
    name=PROG,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.option("--redis-url", metavar="URL", help="Redis to use; overrides REDIS_URL.")
@click.option(
    "--tenant",
    metavar="NAME",
    envvar="MOONQ_TENANT",
    help="Act as this tenant (MOONQ_TENANTS_FILE): submit as it, see only its jobs and dead letters.",
)
def cli(redis_url: str | None, tenant: str | None) -> None:
    """Chat-completion jobs on a Celery + Redis queue.

    Submit, follow and manage jobs, run batch files, watch the fleet (top), serve the HTTP
    gateway, run the local API simulator or the demo. `moonq COMMAND --help` for each.

    \b
    Shell completion (bash; zsh_source or fish_source for zsh or fish):
      eval "$(_MOONQ_COMPLETE=bash_source moonq)"   # in ~/.bashrc
    """


@cli.command("submit")
@click.argument("prompt", required=False)
@click.option("--file", type=click.Path(allow_dash=True), help="A JSON chat-completions request ('-' = stdin).")
@click.option("--model", help=f"Model (default {commands.DEFAULT_MODEL}; overrides the file's).")
@click.option("--system", help="A system message.")
@click.option("--max-tokens", type=int, help="max_completion_tokens.")
@click.option("--priority", type=int, default=5, help="0 (most urgent) to 9.")
@click.option("--idempotency-key", help="The same key again returns the same job instead of a new run.")
@click.option("--webhook", metavar="URL", help="POST the job's outcome here when it ends (signed; docs/webhooks.md).")
@click.option(
    "--webhook-event",
    "webhook_events",
    multiple=True,
    type=click.Choice(["started", "retry"]),
    help="Also POST this progress event to --webhook (repeatable).",
)
@click.option("--on-done", metavar="TASK", help="Send the outcome to this Celery task when the job ends.")
@click.option("--on-done-queue", metavar="QUEUE", help="The queue of --on-done's task (default: celery).")
@click.option(
    "--builtin-tools",
    type=click.Choice(["auto"]),
    help="auto: the node runs $web_search's round trips itself; the answer is the final one.",
)
@click.option("--no-wait", is_flag=True, help="Print the job id and return.")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
def submit(
    prompt: str | None,
    file: str | None,
    model: str | None,
    system: str | None,
    max_tokens: int | None,
    priority: int,
    idempotency_key: str | None,
    webhook: str | None,
    webhook_events: tuple[str, ...],
    on_done: str | None,
    on_done_queue: str | None,
    builtin_tools: str | None,
    no_wait: bool,
    as_json: bool,
) -> int:
    """Submit a job and stream its answer.

    PROMPT is the user message (or give --file). Exits 0 when the job completes, 1 if it
    fails, 130 if it is cancelled, 2 for an invalid request.
    """

    def action(client: Client) -> int:
        request = commands.build_request(file=file, prompt=prompt, model=model, system=system, max_tokens=max_tokens)
        return commands.submit(
            client,
            request,
            priority=priority,
            idempotency_key=idempotency_key,
            no_wait=no_wait,
            as_json=as_json,
            webhook=webhook,
            webhook_events=webhook_events or None,
            on_done=on_done,
            on_done_queue=on_done_queue,
            builtin_tools=builtin_tools,
        )

    return _run(action)


@cli.command("follow")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
def follow(job: str, as_json: bool) -> int:
    """Stream a job's events (replayed from the first, then live).

    Exits 0 when JOB completes, 1 if it fails, 130 if it is cancelled, 3 if there is no such job.
    """
    return _run(lambda client: commands.follow(client, job, as_json=as_json))


@cli.command("status")
@click.argument("job")
def status(job: str) -> int:
    """A job's state, as JSON. Exits 3 if there is no such JOB."""
    return _run(lambda client: commands.status(client, job))


@cli.command("result")
@click.argument("job")
@click.option("--timeout", type=float, default=None, help="Seconds to wait at most (default: no limit).")
def result(job: str, timeout: float | None) -> int:
    """Wait for a job and print its completion (JSON).

    Exits 1 if JOB failed or --timeout passed first, 3 if there is no such job.
    """
    return _run(lambda client: commands.result(client, job, timeout))


@cli.command("cancel")
@click.argument("job")
def cancel(job: str) -> int:
    """Cancel a job (queued: never runs; running: stream aborted)."""
    return _run(lambda client: commands.cancel(client, job))


@cli.command("batch")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="JSONL answers; run again to resume.")
@click.option("--window", type=int, default=500, help="Jobs in flight at most.")
def batch(input_path: str, output: str, window: int) -> int:
    """Run an OpenAI/Moonshot batch JSONL file; resumable.

    INPUT has one {custom_id, method, url, body} object per line. Progress (rate, ETA) goes to
    stderr.
    """
    return _run(lambda client: commands.batch(client, input_path, output, window))


@cli.command("failed")
@click.option("--limit", type=int, default=100, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def failed(limit: int, as_json: bool) -> int:
    """List failed jobs (dead letters), newest first."""
    return _run(lambda client: commands.failed(client, limit, as_json=as_json))


@cli.command("retry")
@click.argument("job")
def retry(job: str) -> int:
    """Run a failed or cancelled job again as a new job; prints its id.

    Exits 2 if JOB is neither failed nor cancelled, 3 if there is no such job.
    """
    return _run(lambda client: commands.retry(client, job))


@cli.group("webhooks")
def webhooks() -> None:
    """Webhooks and Celery callbacks that gave up: list them, deliver them again."""


@webhooks.command("failed")
@click.option("--limit", type=int, default=100, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def webhooks_failed(limit: int, as_json: bool) -> int:
    """List deliveries that gave up (dead letters), newest first."""
    return _run(lambda client: commands.webhooks_failed(client, limit, as_json=as_json))


@webhooks.command("redeliver")
@click.argument("delivery_id", metavar="ID")
def webhooks_redeliver(delivery_id: str) -> int:
    """Deliver a dead delivery again (same webhook-id), with a fresh round of retries.

    ID is as `moonq webhooks failed` lists it (webhook:JOB or callback:JOB). Exits 3 if it is not
    a dead letter (any more), 2 if it is not a delivery id.
    """
    return _run(lambda client: commands.webhooks_redeliver(client, delivery_id))


@cli.command("top")
@click.option(
    "--node",
    "nodes",
    multiple=True,
    metavar="URL",
    help="A node's metrics URL, repeatable; added to the nodes announced in Redis.",
)
@click.option("--interval", type=float, default=2.0, help="Seconds between scrapes.")
@click.option("--once", is_flag=True, help="Print one snapshot (two scrapes --interval apart) and exit.")
def top(nodes: tuple[str, ...], interval: float, once: bool) -> int:
    """Live view of the fleet from the nodes' /metrics.

    Needs no Grafana: the nodes announce their /metrics URLs in Redis.
    On a terminal the table is redrawn in place until Ctrl-C; otherwise (piped, or --once)
    each snapshot is printed as plain text.
    """
    from console.top import run_top

    return _run(lambda client: run_top(client.settings, list(nodes), interval, once=once))


@cli.command("gateway")
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", type=int, default=8000, help="Port to listen on.")
def gateway(host: str, port: int) -> int:
    """Serve the HTTP gateway (OpenAI-compatible + jobs API).

    Tokens come from MOONQ_GATEWAY_TOKENS; exits 2 when the gateway is not configured.
    """
    from gateway.app import serve

    try:
        serve(host, port)
    except ValueError as err:  # e.g. no tokens configured
        print(f"moonq gateway: {err}", file=sys.stderr)
        return 2
    return 0


@cli.command(
    "simulate",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False, "help_option_names": []},
    short_help="Run the local Moonshot API simulator.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def simulate(args: tuple[str, ...]) -> int:
    """Run the local Moonshot API simulator; its own parser reads ARGS (see `moonq simulate --help`)."""
    from simulator.cli import main as simulator_main

    try:
        return simulator_main(list(args))
    except SystemExit as done:  # its parser exits on --help and on a bad flag (2)
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1


@cli.command("demo")
def demo() -> int:
    """Run the demo: private Redis, simulator, one worker, sample jobs.

    A private redis-server when REDIS_URL is unset, the simulator when MOONSHOT_API_KEY is unset;
    everything it started is stopped at the end. Exits 0 when every sample job succeeded.
    """
    from console.demo import main as demo_main

    return demo_main()


def main(argv: list[str] | None = None) -> int:
    """Run ``moonq`` on ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    Usage errors print click's usage message and return 2. ``_MOONQ_COMPLETE`` set in the
    environment answers a shell-completion request instead, and exits.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        code = cli.main(args=args, prog_name=PROG, complete_var=COMPLETE_VAR, standalone_mode=False)
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.Abort:  # Ctrl-C outside a job command (which handles its own)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
