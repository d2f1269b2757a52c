"""Run one workload against one or more targets and write every output.

A target is a label and a context manager that yields the cluster's addresses (gRPC, and the
OpenAI HTTP API's): an external cluster (`--server`, `--http-server`), or an embedded cluster
started for the run (`--embedded`, one per mode with `--compare`; one after the other, so they
never share the 2 CPU cores). `api="openai"` sends the requests through the HTTP API.

Output folder layout (one target): results.json, summary.md, latency_cdf.png, throughput.png.
Several targets: one sub-folder per label with those four files, plus compare.md and the plots
with every run overlaid at the top level.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.bench.config import BenchConfig
from cluster.bench.metrics import summarize
from cluster.bench.report import load_records, markdown_table, results_document, write_run
from cluster.bench.runner import BenchRunner
from cluster.bench.workload import Workload


@dataclass(frozen=True)
class Addresses:
    """A running cluster's API addresses (``host:port``); ``http`` is "" when it serves no HTTP."""

    grpc: str
    http: str = ""


@dataclass(frozen=True)
class Target:
    """Where to send the workload: `open()` yields the cluster's addresses for the run's duration."""

    label: str
    open: Callable[[], AbstractContextManager[Addresses]]


def external_target(address: str, label: str = "cluster", http_address: str = "") -> Target:
    """A cluster that is already running at `address` (gRPC) and `http_address` (OpenAI API)."""
    return Target(label, lambda: contextlib.nullcontext(Addresses(address, http_address)))


def embedded_target(mode: str, cluster_config: Any = None, colocated_replicas: int | None = None) -> Target:
    """An embedded cluster in `mode` ("disaggregated" | "colocated"), started for the run.

    Colocated runs get `colocated_replicas` decode replicas (None: prefill + decode replicas of
    the disaggregated config), so both modes have the same number of workers, as in vLLM's
    disaggregated-prefill benchmark (1P1D against two plain instances).
    """

    @contextlib.contextmanager
    def open_cluster() -> Iterator[Addresses]:
        from cluster.config import ClusterConfig
        from cluster.embedded import EmbeddedCluster

        base = cluster_config if cluster_config is not None else ClusterConfig()
        config = base.override({"mode": mode})
        if mode == "colocated":
            replicas = colocated_replicas or base.prefill.num_replicas + base.decode.num_replicas
            config = config.override({"decode.num_replicas": replicas})
        with EmbeddedCluster(config) as cluster:
            yield Addresses(cluster.grpc_address, cluster.http_address)

    return Target(mode, open_cluster)


def run_suite(config: BenchConfig, workload: Workload, targets: Sequence[Target], out_dir: Path, *,
              show_progress: bool = True, echo: Callable[[str], None] = print,
              api: str = "grpc") -> list[dict[str, Any]]:
    """Run `workload` against each target in turn through `api` ("grpc" or "openai"); write outputs;
    return the results documents."""
    from cluster.bench.plots import write_plots  # matplotlib: imported only when a run writes plots

    documents: list[dict[str, Any]] = []
    for target in targets:
        run_dir = out_dir if len(targets) == 1 else out_dir / target.label
        echo(f"[pdserve bench] {target.label}: starting")
        with target.open() as addresses:
            http = addresses.http if api == "openai" else None
            if api == "openai" and not http:
                raise RuntimeError(f"{target.label}: the cluster serves no HTTP API (http.enabled is off)")
            address = f"http://{http}" if http else addresses.grpc
            echo(f"[pdserve bench] {target.label}: running against {address} ({api})")
            result = BenchRunner(config, workload, addresses.grpc, show_progress=show_progress,
                                 label=target.label, http_address=http).run()
        summary = summarize(result.records, result.samples, config.slo)
        document = results_document(config, target.label, result, summary, {"address": address, "api": api})
        write_run(run_dir, document)
        write_plots([(target.label, result.records)], run_dir)
        documents.append(document)
    table = markdown_table([(d["label"], d["summary"]) for d in documents])
    if len(targets) > 1:
        (out_dir / "compare.md").write_text("# pdserve bench: side by side\n\n" + table)
        write_plots([(d["label"], load_records(d)) for d in documents], out_dir)
    echo(table)
    echo(f"[pdserve bench] results in {out_dir}")
    return documents
