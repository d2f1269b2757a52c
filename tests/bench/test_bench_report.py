"""Acceptance 1 (the test half): every number in summary.md (and compare.md) is recomputed from the
raw per-request records (send time, message arrival times and token counts, status, usage, server
timings) and the ClusterInfo samples in results.json, by code written here independently of
cluster.bench.metrics (own TTFT/TPOT/ITL/E2E, own percentile, own goodput).

The run is a short one against the fake server (tests/bench/fake_server.py) through the real
`pdserve bench` click command; the 60-second embedded run is a manual check (docs/bench.md).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from cluster.bench.cli import bench
from cluster.bench.config import SLO, BenchConfig, parse_length_mix
from cluster.bench.suite import external_target, run_suite
from cluster.bench.workload import Workload
from tests.bench.fake_server import FakeServer, Plan

PLANS = {
    24: Plan(ttft_ms=30, gap_ms=10, chunk_pattern=(1, 2, 3), cached_tokens=8, kv_transfer_ms=2.0),
    80: Plan(ttft_ms=120, gap_ms=10, chunk_pattern=(1,), cached_tokens=0, kv_transfer_ms=4.0),
    40: Plan(ttft_ms=5, gap_ms=1, chunk_pattern=(1,), error=grpc.StatusCode.UNAVAILABLE),
}


def plan_for(request) -> Plan:
    return PLANS.get(len(request.token_ids.ids), Plan(ttft_ms=1, gap_ms=1, chunk_pattern=(1,)))


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, written out)."""
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def recompute(document: dict) -> dict[str, float]:
    """The table's rows, recomputed from results.json: {metric label: value}."""
    requests, samples = document["requests"], document["cluster_samples"]
    ok = [r for r in requests if r["status"] == "OK"]
    duration = max(r["end_s"] for r in requests) - min(r["send_s"] for r in requests)
    ttft, tpot, itl, e2e = [], [], [], []
    for r in ok:
        times, sizes = r["message_times_s"], r["message_num_tokens"]
        first = next(t for t, n in zip(times, sizes, strict=True) if n > 0)
        n_tokens = sum(sizes)
        ttft.append((first - r["send_s"]) * 1000)
        e2e.append((times[-1] - r["send_s"]) * 1000)
        if n_tokens > 1:
            tpot.append((times[-1] - first) * 1000 / (n_tokens - 1))
        previous = None
        for t, n in zip(times, sizes, strict=True):
            if n and previous is not None:
                itl.append((t - previous) * 1000)
            itl.extend([0.0] * (n - 1 if n else 0))
            previous = t if n else previous
    prompt = sum(r["num_prompt_tokens"] for r in ok)
    completion = sum(sum(r["message_num_tokens"]) for r in ok)
    rows: dict[str, float] = {
        "requests sent": len(requests), "requests completed": len(ok),
        "requests failed": len(requests) - len(ok), "duration (s)": duration,
        "request throughput (req/s)": len(ok) / duration,
        "input token throughput (tok/s)": prompt / duration,
        "output token throughput (tok/s)": completion / duration,
        "total token throughput (tok/s)": (prompt + completion) / duration,
    }
    for name, values in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl), ("E2E", e2e)):
        rows[f"{name} mean (ms)"] = mean(values)
        for p in (50, 90, 99):
            rows[f"{name} p{p} (ms)"] = percentile(values, p)
    slo = document["config"]["slo"]
    good = []   # DistServe: meets every SLO; a 1-token answer has no TPOT and meets a TPOT SLO
    for r, t in zip(ok, ttft, strict=True):
        n_tokens = sum(r["message_num_tokens"])
        first = t / 1000 + r["send_s"]
        request_tpot = (r["message_times_s"][-1] - first) * 1000 / (n_tokens - 1) if n_tokens > 1 else 0.0
        if t <= slo["ttft_ms"] and request_tpot <= slo["tpot_ms"]:
            good.append(r)
    goodput_label = f"goodput (req/s, SLO ttft<={slo['ttft_ms']:g}ms, tpot<={slo['tpot_ms']:g}ms)"
    rows[goodput_label] = len(good) / duration
    rows["requests meeting SLO"] = len(good)
    rows["prefix cache hit rate (cached/prompt tokens)"] = (
        sum(r["usage"]["cached_tokens"] for r in ok) / sum(r["usage"]["prompt_tokens"] for r in ok))
    rows["KV transfer share (sum kv_transfer_ms / sum e2e_ms)"] = (
        sum(r["timings"]["kv_transfer_ms"] for r in ok) / sum(r["timings"]["e2e_ms"] for r in ok))
    for pool in {name for s in samples for name in s["pools"]}:
        per_sample = [s["pools"][pool] for s in samples if s["pools"].get(pool)]
        rows[f"pool {pool}: replicas (mean)"] = mean([len(reps) for reps in per_sample])
        rows[f"pool {pool}: running requests per replica (mean)"] = mean(
            [mean([r["running_requests"] for r in reps]) for reps in per_sample])
        rows[f"pool {pool}: queued requests per replica (mean)"] = mean(
            [mean([r["queued_requests"] for r in reps]) for reps in per_sample])
        rows[f"pool {pool}: KV blocks in use (mean share)"] = mean(
            [mean([r["kv_blocks_used"] / r["kv_blocks_total"] for r in reps]) for reps in per_sample])
    for status, count in Counter(r["status"] for r in requests if r["status"] != "OK").items():
        rows[f"errors: {status}"] = count
    return rows


def parse_table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """Column labels and {metric: [cell per column]} of the Markdown table."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header[1:], rows


def assert_table_matches(cells: dict[str, str], expected: dict[str, float]) -> None:
    """Same metrics; each printed number equals the recomputed one to its printed precision."""
    assert set(cells) == set(expected)
    for metric, text in cells.items():
        decimals = len(text.partition(".")[2])
        tolerance = 0.5 * 10 ** -decimals + 1e-9 * abs(expected[metric])
        assert abs(float(text) - expected[metric]) <= tolerance, (metric, text, expected[metric])


@pytest.fixture(scope="module")
def server():
    with FakeServer(plan_for) as fake:
        yield fake


def test_cli_summary_recomputed_from_results_json(server, tmp_path: Path):
    out = tmp_path / "run"
    result = CliRunner().invoke(bench, [
        "--server", server.address, "--lengths", "24x9:3,80x6:1,40x4:1", "--rate", "40",
        "--num-requests", "16", "--goodput", "ttft:80", "tpot:20", "--seed", "5", "--poll-interval", "0.05",
        "--output-dir", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"results.json", "summary.md", "latency_cdf.png",
                                               "throughput.png"}
    document = json.loads((out / "results.json").read_text())
    assert len(document["requests"]) == 16
    assert {r["num_prompt_tokens"] for r in document["requests"]} == set(PLANS)   # all classes ran
    assert document["config"]["slo"] == {"ttft_ms": 80.0, "tpot_ms": 20.0, "e2e_ms": None}
    for r in document["requests"]:   # the convenience figures agree with the raw stamps
        if r["status"] == "OK":
            first = next(t for t, n in zip(r["message_times_s"], r["message_num_tokens"], strict=True) if n)
            assert r["first_token_s"] == first
            assert r["ttft_ms"] == pytest.approx((first - r["send_s"]) * 1000)
            assert r["e2e_ms"] == pytest.approx((r["message_times_s"][-1] - r["send_s"]) * 1000)
            assert len(r["itl_ms"]) == sum(r["message_num_tokens"]) - 1
    labels, rows = parse_table((out / "summary.md").read_text())
    assert labels == ["cluster"]
    assert_table_matches({m: c[0] for m, c in rows.items()}, recompute(document))
    for png in ("latency_cdf.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_table_recomputed_per_run(server, tmp_path: Path):
    config = BenchConfig(arrival="closed", concurrency=3, num_requests=9, seed=2,
                         slo=SLO(ttft_ms=80, tpot_ms=20), lengths=parse_length_mix("24x7:2,80x5:1"),
                         poll_interval_s=0.05)
    targets = [external_target(server.address, "disaggregated"),
               external_target(server.address, "colocated")]
    documents = run_suite(config, Workload(config), targets, tmp_path, show_progress=False,
                          echo=lambda _: None)
    labels, rows = parse_table((tmp_path / "compare.md").read_text())
    assert labels == ["disaggregated", "colocated"]
    for column, label in enumerate(labels):
        document = json.loads((tmp_path / label / "results.json").read_text())
        assert document == json.loads(json.dumps(documents[column]))
        assert_table_matches({m: c[column] for m, c in rows.items()}, recompute(document))
    # the same workload on both sides: identical prompts and lengths, in the same order
    prompts = [[(r["num_prompt_tokens"], r["max_tokens"]) for r in d["requests"]] for d in documents]
    assert prompts[0] == prompts[1]
