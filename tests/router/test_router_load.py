"""LoadReport validation and LoadTable watermark hysteresis."""

from __future__ import annotations

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
