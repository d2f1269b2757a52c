"""The per-prompt-length breakdown of a run (cluster.bench.breakdown) on hand-made records."""

from __future__ import annotations

from cluster.bench.breakdown import breakdown_rows
from cluster.bench.client import RequestRecord


def make(length: int, send_s: float, times: list[float], status: str = "OK") -> RequestRecord:
    return RequestRecord(index=0, request_id="r", num_prompt_tokens=length, max_tokens=len(times),
                         send_s=send_s, status=status, message_times_s=times,
                         message_num_tokens=[1] * len(times), end_s=times[-1],
                         timings={"queue_ms": 5.0, "prefill_ms": 40.0})


def test_one_row_per_prompt_length_over_completed_requests():
    records = [make(32, 0.0, [0.1, 0.12, 0.14]),           # ttft 100, tpot 20, itl 20 20
               make(1536, 0.0, [0.5, 0.6]),                 # ttft 500, tpot 100, itl 100
               make(32, 0.0, [9.0], status="UNAVAILABLE")]  # failed: not counted
    rows = breakdown_rows("run", records)
    assert rows == [
        "| run | 32 | 1 | 100.0 / 100.0 | 20.0 / 20.0 | 20.0 / 20.0 | 5.0 | 40.0 |",
        "| run | 1536 | 1 | 500.0 / 500.0 | 100.0 / 100.0 | 100.0 / 100.0 | 5.0 | 40.0 |",
    ]
