"""``python -m simulator`` / ``moonq simulate``: serve the simulator until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from simulator.config import SimConfig
from simulator.faults import DEFAULT_RANDOM_KINDS
from simulator.quota import QUOTA_MODES
from simulator.server import SimServer

# Interactive use wants a visible stream: ~0.4 s to first token, then ~30 chunks a second.
DEFAULT_LATENCY_MS = 400
DEFAULT_CHUNK_INTERVAL_MS = 30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moonq simulate", description="Local stand-in for the Moonshot (Kimi) API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same answers")
    parser.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_MS, help="time to first token")
    parser.add_argument(
        "--chunk-interval-ms", type=float, default=DEFAULT_CHUNK_INTERVAL_MS, help="pause between chunks"
    )
    parser.add_argument("--tokens-per-chunk", type=int, default=None, help="fixed fragment size (default: 1-3)")
    parser.add_argument(
        "--answer-tokens", type=int, nargs=2, metavar=("MIN", "MAX"), default=None, help="answer length range"
    )
    faults = parser.add_argument_group("faults and account limits")
    faults.add_argument("--fault-rate", type=float, default=0.0, help="share of requests given a random fault, 0..1")
    faults.add_argument(
        "--fault-kinds",
        type=_specs,
        default=DEFAULT_RANDOM_KINDS,
        help=f"comma-separated faults to draw from, e.g. overload,stall:2 (default: {','.join(DEFAULT_RANDOM_KINDS)})",
    )
    faults.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    faults.add_argument(
        "--tpm", type=int, default=None, help="tokens per minute, prompt + max_tokens (default: unlimited)"
    )
    faults.add_argument("--max-concurrency", type=int, default=None, help="requests in flight (default: unlimited)")
    faults.add_argument(
        "--quota-mode",
        choices=QUOTA_MODES,
        default="window",
        help="RPM and TPM as a sliding minute (default) or as token buckets of that size refilled per minute",
    )
    return parser


def _specs(text: str) -> tuple[str, ...]:
    return tuple(spec.strip() for spec in text.split(",") if spec.strip())


def main(argv: list[str] | None = None) -> int:
    """Runs the simulator in the foreground; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        cfg = SimConfig(
            seed=args.seed,
            first_token_latency_s=args.latency_ms / 1000,
            chunk_interval_s=args.chunk_interval_ms / 1000,
            tokens_per_chunk=args.tokens_per_chunk,
            answer_tokens=tuple(args.answer_tokens) if args.answer_tokens else SimConfig.answer_tokens,
            fault_rate=args.fault_rate,
            fault_kinds=args.fault_kinds,
            rpm=args.rpm,
            tpm=args.tpm,
            max_concurrency=args.max_concurrency,
            quota_mode=args.quota_mode,
        )
    except ValueError as err:
        print(f"moonq simulate: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    restore = _on_signals(stop)
    try:
        with SimServer(cfg, host=args.host, port=args.port) as sim:
            print(f"moonq simulator listening on {sim.base_url}", flush=True)
            while not stop.wait(0.5):
                pass
    except OSError as err:
        print(f"moonq simulate: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    finally:
        restore()
    return 0


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    # Signal handlers can only be installed from the main thread; elsewhere the caller stops us.
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
