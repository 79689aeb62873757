"""The key layout (moonq/keys.py): a job's keys and the indexes its scripts touch share one hash slot."""

from __future__ import annotations

import uuid

from redis.crc import key_slot

from moonq.keys import GROUP_TAGS, GROUPS, Keys, group_of, new_job_id
from worker.limiter_state import LimiterKeys


def test_each_group_tag_hashes_into_its_own_sixteenth_of_the_slots() -> None:
    slots = [key_slot(tag.encode()) for tag in GROUP_TAGS]
    assert [slot // 1024 for slot in slots] == list(GROUPS)
    # Three primaries with the default even split (0-5460, 5461-10922, 10923-16383) hold 5, 6 and 5 groups.
    assert [sum(lo <= s <= hi for s in slots) for lo, hi in ((0, 5460), (5461, 10922), (10923, 16383))] == [5, 6, 5]


def test_every_key_a_job_script_touches_is_in_the_jobs_slot() -> None:
    keys = Keys("p")
    for _ in range(200):
        job_id = str(uuid.uuid4())
        names = [
            keys.job(job_id),
            keys.log(job_id),
            keys.events(job_id),
            keys.active_for(job_id),
            keys.failed_for(job_id),
            keys.deliveries_for(job_id),
            keys.recent_in(group_of(job_id)),
            keys.recent_in(group_of(job_id), "acme"),
            keys.deliveries_due_in(group_of(job_id)),
            keys.deliveries_dead_in(group_of(job_id)),
            keys.delivery(f"webhook:{job_id}", job_id),
        ]
        assert len({key_slot(name.encode()) for name in names}) == 1, names
        assert all(name.startswith("p:") for name in names)


def test_a_job_with_an_idempotency_key_is_in_the_keys_slot() -> None:
    keys = Keys("p")
    for n in range(200):
        key, tenant = f"order-{n}", "acme" if n % 2 else "default"
        job_id = new_job_id(Keys.idempotency_group(key, tenant))
        assert uuid.UUID(job_id).version == 4
        assert key_slot(keys.idempotency(key, tenant).encode()) == key_slot(keys.job(job_id).encode())


def test_the_group_of_an_id_is_its_last_hex_digit_or_a_crc() -> None:
    assert group_of("0b9d3a43-6f1e-4d5c-8c8e-5d3f0a9e1e2c") == 12
    assert group_of("0B9D3A43-6F1E-4D5C-8C8E-5D3F0A9E1E2F") == 15
    assert group_of("job-x") == group_of("job-x") and 0 <= group_of("job-x") < 16
    assert group_of("") in GROUPS
    assert {group_of(new_job_id(g)) for g in GROUPS} == set(GROUPS)


def test_the_names_are_the_documented_ones() -> None:
    keys = Keys("moonq")
    job_id = "0b9d3a43-6f1e-4d5c-8c8e-5d3f0a9e1e2c"
    assert keys.job(job_id) == f"moonq:job:{{c13}}:{job_id}"
    assert keys.events(job_id) == f"moonq:events:{{c13}}:{job_id}"
    assert keys.active_in(0) == "moonq:active:{03}"
    assert keys.recent_in(9, "acme") == "moonq:recent:acme:{9}"
    assert keys.idempotency("k").startswith("moonq:idem:{")
    assert LimiterKeys.for_prefix("moonq").inflight == "moonq:{limit}:inflight"
