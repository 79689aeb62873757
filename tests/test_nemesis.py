"""The nemesis (tests/nemesis/): one short seeded fault run per broker, checked over its whole history.

Each run starts its own Redis (AOF), simulator and three real ``celery -A worker worker`` nodes
(each behind its own TCP proxy), submits about 100 jobs while the nemesis kills, stops, pauses and
clock-skews nodes, restarts and pauses Redis and cuts or black-holes links, then checks every
promise (tests/nemesis/checker.py). A failure lists each violation with its job id and evidence;
the seed reproduces the schedule (``python -m tests.nemesis.run --seeds 1 --first-seed N --jobs 100``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import RABBITMQ_MISSING, rabbitmq_binary
from tests.nemesis.run import RunConfig, run_seed

SEED = int(os.environ.get("MOONQ_NEMESIS_SEED", "1"))


@pytest.mark.serial  # its recovery deadlines assume the machine is its own
@pytest.mark.timeout(480)
def test_nemesis_on_the_redis_broker(tmp_path: Path) -> None:
    report = run_seed(RunConfig(seed=SEED, jobs=100, broker="redis", workdir=tmp_path))
    assert report.jobs >= 90 and sum(report.faults.values()) >= 5, report.summary()
    assert not report.violations, report.failure_message()


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_nemesis_on_rabbitmq(tmp_path: Path) -> None:
    if rabbitmq_binary() is None:
        assert not os.environ.get("CI"), "CI must install rabbitmq-server (.ci/run)"
        pytest.skip(RABBITMQ_MISSING)
    report = run_seed(RunConfig(seed=SEED, jobs=100, broker="rabbitmq", workdir=tmp_path))
    assert report.jobs >= 90 and sum(report.faults.values()) >= 5, report.summary()
    assert not report.violations, report.failure_message()
