"""LoadReport validation and LoadTable watermark hysteresis."""

from __future__ import annotations

import random

import pytest

from router.config import RouterConfig
from router.load import LoadReport, LoadTable


def report(worker_id: str, queued: int, at: float, running: int = 0, free: int = 100) -> LoadReport:
    return LoadReport(worker_id, queued, running, free, 100, at)


def absolute_config() -> RouterConfig:
    return RouterConfig(
        high_watermark_tokens=1000, low_watermark_tokens=500, high_load_factor=0, low_load_factor=0
    )


def test_absolute_watermarks_engage_strictly_above_high_and_release_strictly_below_low() -> None:
    table = LoadTable(absolute_config(), ["a", "b"])
    states = []
    for step, queued in enumerate([0, 1000, 1001, 999, 600, 500, 499, 1000, 1001]):
        table.update(report("a", queued, float(step)))
        states.append(table.is_hot("a"))
    assert states == [False, False, True, True, True, True, False, False, True]
    assert not table.is_hot("b")


def reference_state(
    history: list[tuple[str, int]], config: RouterConfig, members: list[str]
) -> dict[str, bool]:
    """Independent replay of the documented rule: thresholds from the mean after each report."""
    queued = {w: 0 for w in members}
    hot = {w: False for w in members}
    for worker, tokens in history:
        queued[worker] = tokens
        mean = sum(queued.values()) / len(members)
        high = max(config.high_watermark_tokens, config.high_load_factor * mean)
        low = max(config.low_watermark_tokens, config.low_load_factor * mean)
        if hot[worker] and tokens < low:
            hot[worker] = False
        elif not hot[worker] and tokens > high:
            hot[worker] = True
    return hot


def test_relative_watermarks_follow_the_pool_mean() -> None:
    config = RouterConfig(
        high_watermark_tokens=100, low_watermark_tokens=50, high_load_factor=1.5, low_load_factor=1.2
    )
    members = ["a", "b", "c", "d"]
    table = LoadTable(config, members)
    history: list[tuple[str, int]] = [("b", 1000), ("c", 1000), ("d", 1000)]
    for worker, tokens in history:
        table.update(report(worker, tokens, 0.0))
    # a=1600: mean 1150, high 1725: not hot; a=2000: mean 1250, high 1875: hot;
    # a=1300: mean 1075, low 1290: still hot; a=1280: mean 1070, low 1284: cool.
    expected_a = [False, False, True, True, False]
    for step, tokens in enumerate([1000, 1600, 2000, 1300, 1280]):
        table.update(report("a", tokens, float(step + 1)))
        history.append(("a", tokens))
        assert table.is_hot("a") == expected_a[step]
        assert table.is_hot("a") == reference_state(history, config, members)["a"]


def test_idle_pool_uses_the_absolute_floor() -> None:
    config = RouterConfig(
        high_watermark_tokens=100, low_watermark_tokens=50, high_load_factor=1.5, low_load_factor=1.2
    )
    table = LoadTable(config, ["a", "b"])
    table.update(report("a", 100, 0.0))  # mean 50 -> high = max(100, 75) = 100: not above
    assert not table.is_hot("a")
    table.update(report("a", 101, 1.0))
    assert table.is_hot("a")


def test_stale_and_unknown_reports_are_ignored() -> None:
    table = LoadTable(absolute_config(), ["a"])
    assert table.update(report("a", 2000, 5.0))
    assert table.is_hot("a")
    assert not table.update(report("a", 0, 4.0))
    assert table.queued_tokens("a") == 2000 and table.is_hot("a")
    # the same report again (same reported_at) is a duplicate: it keeps the local estimate
    table.debit("a", queued_tokens=50)
    assert not table.update(report("a", 2000, 5.0))
    assert table.queued_tokens("a") == 2050
    assert not table.update(report("zz", 0, 9.0))
    assert table.free_kv_blocks("zz") is None and table.queued_tokens("zz") == 0  # not recorded


def test_debit_adds_until_the_next_report() -> None:
    table = LoadTable(absolute_config(), ["a", "b"])
    table.update(report("a", 900, 1.0, running=2, free=80))
    table.debit("a", queued_tokens=200, running_requests=1, kv_blocks=30)
    assert table.queued_tokens("a") == 1100 and table.running_requests("a") == 3
    assert table.free_kv_blocks("a") == 50
    assert table.is_hot("a")  # the estimate crossed the high watermark
    assert table.mean_queued_tokens() == 550
    table.update(report("a", 400, 2.0, running=1, free=90))
    assert table.queued_tokens("a") == 400 and table.free_kv_blocks("a") == 90
    assert not table.is_hot("a")
    assert table.mean_queued_tokens() == 200
    assert table.free_kv_blocks("b") is None
    with pytest.raises(KeyError):
        table.debit("nope", queued_tokens=1)


def counted(worker_id: str, queued: int, at: float, received: int, free: int = 100) -> LoadReport:
    return LoadReport(worker_id, queued, 0, free, 100, at, requests_received=received)


def test_a_report_taken_before_a_charged_request_arrived_keeps_its_charge() -> None:
    table = LoadTable(absolute_config(), ["a", "b"])
    table.update(counted("a", 0, 1.0, received=4))
    table.debit("a", queued_tokens=1200, running_requests=1, kv_blocks=10)
    assert table.is_hot("a")
    table.update(counted("a", 0, 2.0, received=4, free=100))  # taken while the request was on its way
    assert table.queued_tokens("a") == 1200 and table.free_kv_blocks("a") == 90 and table.is_hot("a")
    table.update(counted("a", 300, 3.0, received=5, free=90))  # it has arrived: the report counts it
    assert table.queued_tokens("a") == 300 and table.free_kv_blocks("a") == 90 and not table.is_hot("a")
    assert table.running_requests("a") == 0 and table.mean_queued_tokens() == 150


def test_a_report_drops_the_oldest_charges_one_per_request_received() -> None:
    table = LoadTable(absolute_config(), ["a"])
    table.update(counted("a", 0, 1.0, received=0))
    for tokens in (100, 200, 400):
        table.debit("a", queued_tokens=tokens, running_requests=1, kv_blocks=1)
    table.update(counted("a", 50, 2.0, received=2))
    assert table.queued_tokens("a") == 450 and table.running_requests("a") == 1
    assert table.free_kv_blocks("a") == 99
    table.update(counted("a", 0, 3.0, received=9))  # more than were charged here (other ingresses)
    assert table.queued_tokens("a") == 0 and table.free_kv_blocks("a") == 100


def test_an_unacknowledged_charge_lives_a_bounded_number_of_reports() -> None:
    table = LoadTable(absolute_config(), ["a"])
    table.update(counted("a", 0, 0.0, received=3))
    table.debit("a", queued_tokens=700)  # never arrives
    lifetime = LoadTable.CHARGE_LIFETIME_REPORTS
    for step in range(1, lifetime):
        table.update(counted("a", 0, float(step), received=3))
        assert table.queued_tokens("a") == 700, step
    table.update(counted("a", 0, float(lifetime), received=3))
    assert table.queued_tokens("a") == 0


def test_a_report_without_a_count_or_with_a_count_that_went_down_replaces_every_charge() -> None:
    table = LoadTable(absolute_config(), ["a"])
    table.update(counted("a", 0, 1.0, received=8))
    table.debit("a", queued_tokens=700)
    table.update(counted("a", 10, 2.0, received=2))  # the worker restarted
    assert table.queued_tokens("a") == 10
    table.debit("a", queued_tokens=700)
    table.update(report("a", 20, 3.0))
    assert table.queued_tokens("a") == 20


def test_counted_reports_and_charges_match_an_independent_model() -> None:
    """Random charges and counted reports (some lagging behind the requests sent) against a plain
    list of outstanding charges; the pool totals must stay the sums over workers."""
    rng = random.Random(7)
    members = ["a", "b", "c"]
    table = LoadTable(RouterConfig(), members)
    # per worker: (report no. when charged, tokens, blocks)
    outstanding: dict[str, list[tuple[int, int, int]]] = {w: [] for w in members}
    sent = {w: 0 for w in members}
    received = {w: 0 for w in members}
    reported = {w: (0, 100) for w in members}  # (queued, free) of the last report
    reports = {w: 0 for w in members}
    lifetime = LoadTable.CHARGE_LIFETIME_REPORTS
    for step in range(3000):
        worker = rng.choice(members)
        if rng.random() < 0.6:
            tokens, blocks = rng.randrange(0, 900), rng.randrange(0, 4)
            table.debit(worker, queued_tokens=tokens, running_requests=1, kv_blocks=blocks)
            outstanding[worker].append((reports[worker], tokens, blocks))
            sent[worker] += 1
        else:
            received[worker] = rng.randint(received[worker], max(received[worker], sent[worker]))
            queued, free = rng.randrange(0, 3000), rng.randrange(0, 101)
            acknowledged = received[worker] - (reported[worker][2] if len(reported[worker]) > 2 else 0)
            table.update(counted(worker, queued, float(step), received[worker], free))
            reports[worker] += 1
            left = outstanding[worker][acknowledged:]
            outstanding[worker] = [c for c in left if c[0] > reports[worker] - lifetime]
            reported[worker] = (queued, free, received[worker])
        for w in members:
            queued_w = (reported[w][0] if reports[w] else 0) + sum(c[1] for c in outstanding[w])
            assert table.queued_tokens(w) == queued_w, (step, w)
            if reports[w]:
                assert table.free_kv_blocks(w) == reported[w][1] - sum(c[2] for c in outstanding[w])
            assert table.running_requests(w) == len(outstanding[w])
        expected_mean = sum(table.queued_tokens(w) for w in members) / len(members)
        assert table.mean_queued_tokens() == pytest.approx(expected_mean)
        assert table.total_work == sum(table.work.values())


def test_set_workers_keeps_reports_of_workers_that_stay() -> None:
    table = LoadTable(absolute_config(), ["a", "b"])
    table.update(report("a", 5000, 1.0))
    table.update(report("b", 7000, 1.0))
    table.set_workers(["a", "c"])
    assert table.worker_ids == ("a", "c")
    assert table.is_hot("a") and table.queued_tokens("a") == 5000
    assert table.free_kv_blocks("b") is None and not table.is_hot("b")
    assert table.mean_queued_tokens() == 2500


@pytest.mark.parametrize(
    "kwargs",
    [
        {"worker_id": ""},
        {"queued_prefill_tokens": -1},
        {"free_kv_blocks": 101},
        {"reported_at": float("nan")},
    ],
)
def test_bad_reports_are_rejected(kwargs: dict) -> None:
    fields = {
        "worker_id": "a",
        "queued_prefill_tokens": 0,
        "running_requests": 0,
        "free_kv_blocks": 10,
        "total_kv_blocks": 100,
        "reported_at": 0.0,
    }
    fields.update(kwargs)
    with pytest.raises(ValueError):
        LoadReport(**fields)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "random"}, "policy"),
        ({"block_size": 0}, "block_size"),
        ({"prefix_depth_blocks": 0}, "prefix_depth_blocks"),
        ({"virtual_nodes": 0}, "virtual_nodes"),
        ({"high_watermark_tokens": 10, "low_watermark_tokens": 10}, "high_watermark_tokens"),
        ({"low_watermark_tokens": -1}, "low_watermark_tokens"),
        ({"high_load_factor": 0.5}, "high_load_factor"),
        ({"high_load_factor": 1.5, "low_load_factor": 1.5}, "low_load_factor"),
        ({"high_load_factor": 0, "low_load_factor": 1.0}, "low_load_factor"),
        ({"hash_seed": ""}, "hash_seed"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RouterConfig(**kwargs)
