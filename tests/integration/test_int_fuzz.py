"""Issue 15, acceptance 3 (the part that fits ``make test``): requests hypothesis draws over every field
of the Generate request (the bytes-typed twin: invalid UTF-8, negative and huge numbers, NaN, unicode,
token ids past the vocabulary, stop strings, chat messages, tenants; unknown fields, truncated and garbage
protobuf), OpenAI bodies drawn over its fields, and garbage bytes on both ports (random bytes, the HTTP/2
preface with random frames, broken HTTP/1.1). Zero INTERNAL / UNKNOWN (and no HTTP 500), no replica
restarted (same Serve replica actors, same PIDs), and the server then serves a normal request exactly.
The full 10,000-request run is ``python -m cluster.bench.fuzz`` (docs/benchmarks.md, "Fuzzing")."""

from __future__ import annotations

import pytest

from cluster.bench.fuzz import draw, run
from engine.builtin import BUILTIN_VOCAB_SIZE
from tests.integration.int_helpers import cluster_config

pytestmark = pytest.mark.integration

NUM_REQUESTS = 500  # hypothesis draws ~4 ms each on a loaded 2-core machine; most are refused at once
NUM_HTTP = 100
NUM_RAW = 80


def test_fuzzed_requests_and_garbage_never_internal(pd_cluster) -> None:
    cluster = pd_cluster.cluster or pd_cluster.ensure(cluster_config(1, 1))
    drawn = draw(NUM_REQUESTS, NUM_HTTP, BUILTIN_VOCAB_SIZE, seed=15)
    app = cluster.config.app_name
    report = run(cluster.grpc_address, cluster.http_address, drawn, NUM_RAW, seed=15, app_name=app)
    print(report.summary())
    assert sum(report.grpc_codes.values()) == NUM_REQUESTS
    assert report.num_forbidden == 0, report.summary()
    assert report.grpc_codes["INVALID_ARGUMENT"] > NUM_REQUESTS // 3  # the draw does reach validation
    assert report.grpc_codes["OK"] > 0  # ... and the engines
    assert report.replicas_before and report.replicas_before == report.replicas_after
    assert report.serves_after
