"""``pdserve plan`` and ``pdserve simulate`` (registered on the ``pdserve`` group by cluster/cli.py)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import click

from capacity.costs import CostModel, LinearCost, RooflineCost, ServedCost
from capacity.model import DEVICES, MIB, MODELS, ModelSpec, NodeSpec, model_from_checkpoint
from capacity.plan import EngineLimits, SLOs, WorkloadStats, plan

_MODEL_HELP = f"A checkpoint directory, or one of {', '.join(MODELS)}."


def resolve_model(
    model: str,
    layers: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    heads: int | None,
    params: float | None,
    dtype: str | None,
) -> ModelSpec:
    """A named model or checkpoint dir, with any dimension overridden by the explicit options."""
    spec = MODELS[model] if model in MODELS else model_from_checkpoint(model)
    changes = {
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "num_heads": heads,
        "num_params": params,
        "dtype": dtype,
    }
    return replace(spec, **{k: v for k, v in changes.items() if v is not None})


def cost_model(model: ModelSpec, node: NodeSpec, calibration: str | None) -> CostModel:
    """A calibration file (an engine fit, or a served cluster's: ``"kind": "served"``) or the roofline."""
    if not calibration:
        return RooflineCost(model, node)
    data = json.loads(Path(calibration).read_text())
    if data.pop("kind", None) == "served":
        return ServedCost(**data)
    return LinearCost(**data)


def model_options(func):
    options = [
        click.option("--model", default="llama-70b", show_default=True, help=_MODEL_HELP),
        click.option("--layers", type=int, default=None),
        click.option("--kv-heads", type=int, default=None),
        click.option("--head-dim", type=int, default=None),
        click.option("--heads", type=int, default=None),
        click.option("--params", type=float, default=None, help="Parameter count (e.g. 70e9)."),
        click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None),
        click.option("--device", type=click.Choice(sorted(DEVICES)), default="H100", show_default=True),
        click.option(
            "--tp", type=int, default=8, show_default=True, help="Devices per node (tensor parallel)."
        ),
        click.option(
            "--reserved-gb",
            type=float,
            default=100.0,
            show_default=True,
            help="Per-node memory kept from weights and KV (activations, graphs).",
        ),
        click.option("--memory-gb", type=float, default=None, help="Override the device's memory (GB)."),
        click.option(
            "--calibration",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="A calibrated step-cost JSON (pdserve simulate --calibrate) instead of the roofline.",
        ),
        click.option("--ttft-ms", type=float, default=700.0, show_default=True, help="TTFT p99 SLO."),
        click.option("--tpot-ms", type=float, default=40.0, show_default=True, help="TPOT p99 SLO."),
        click.option("--hit-rate", type=float, default=0.0, show_default=True, help="Prefix cache hit rate."),
        click.option("--max-num-batched-tokens", type=int, default=8192, show_default=True),
        click.option("--max-num-seqs", type=int, default=1024, show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _node(device: str, tp: int, reserved_gb: float, memory_gb: float | None) -> NodeSpec:
    spec = DEVICES[device]
    if memory_gb is not None:
        spec = replace(spec, memory_bytes=memory_gb * 1e9)
    return NodeSpec(spec, tp, reserved_gb * 1e9)


@click.command("plan")
@model_options
@click.option("--input-len", type=float, default=3000, show_default=True, help="Mean prompt tokens.")
@click.option("--output-len", type=float, default=400, show_default=True, help="Mean output tokens.")
@click.option("--p99-input-len", type=float, default=None, help="p99 prompt tokens [default: 2 x mean].")
@click.option("--rate", type=float, default=5000, show_default=True, help="Peak requests/s.")
@click.option(
    "--trace",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Take the length means / p99 from a trace (with --length-scale) instead.",
)
@click.option("--length-scale", type=float, default=1.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON.")
def plan_command(
    model: str,
    layers: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    heads: int | None,
    params: float | None,
    dtype: str | None,
    device: str,
    tp: int,
    reserved_gb: float,
    memory_gb: float | None,
    calibration: str | None,
    ttft_ms: float,
    tpot_ms: float,
    hit_rate: float,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    input_len: float,
    output_len: float,
    p99_input_len: float | None,
    rate: float,
    trace: str | None,
    length_scale: float,
    as_json: bool,
) -> None:
    """Size the prefill and decode pools for a model, a node, a workload, a hit rate and SLOs."""
    spec = resolve_model(model, layers, kv_heads, head_dim, heads, params, dtype)
    node = _node(device, tp, reserved_gb, memory_gb)
    cost = cost_model(spec, node, calibration)
    if trace:
        from capacity.workload import from_trace, stats

        workload = stats(from_trace(trace, length_scale=length_scale, max_context=spec.max_context), rate)
    else:
        workload = WorkloadStats(input_len, output_len, p99_input_len or 2 * input_len, rate)
    limits = EngineLimits(16, max_num_batched_tokens, max_num_seqs)
    result = plan(spec, node, cost, workload, hit_rate, SLOs(ttft_ms / 1e3, tpot_ms / 1e3), limits)
    if as_json:
        click.echo(
            json.dumps(
                {"cost_model": cost.describe(), "workload": workload.__dict__, **result.to_dict()}, indent=1
            )
        )
        return
    click.echo(format_plan(spec, node, cost, workload, hit_rate, result))


def format_plan(
    spec: ModelSpec, node: NodeSpec, cost: CostModel, workload: WorkloadStats, hit_rate: float, result
) -> str:
    lines = [
        f"model {spec.name}: {spec.num_layers} layers, {spec.num_kv_heads} KV heads x {spec.head_dim}, "
        f"{spec.dtype}, {spec.num_params / 1e9:.2f}B params ({spec.weight_bytes / 1e9:.1f} GB of weights)",
        f"node: {node.tp} x {node.device.name} ({node.memory_bytes / 1e9:.0f} GB, "
        f"{node.reserved_bytes / 1e9:.0f} GB reserved)",
        f"cost model: {cost.describe()}",
        f"workload: mean {workload.mean_input:.0f} in / {workload.mean_output:.0f} out tokens, p99 in "
        f"{workload.p99_input:.0f}, peak {workload.peak_rate:g} req/s, prefix hit rate {hit_rate:.0%}",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| KV per token | {result.kv_bytes_per_token:,} B ({result.kv_bytes_per_token / MIB:.4f} MiB) |",
        f"| KV per mean request | {result.kv_bytes_per_request / MIB:,.1f} MiB |",
        f"| KV budget per node | {result.kv_budget_bytes / 1e9:,.1f} GB |",
        f"| KV tokens per node | {result.kv_tokens_per_node:,} |",
        f"| concurrent mean requests per node | {result.concurrency_per_node:,} |",
        f"| concurrent 4k-token requests per node | {result.concurrency_4k_per_node:,} |",
        f"| decode batch meeting TPOT | {result.decode_batch} (step {result.decode_step_s * 1e3:.1f} ms) |",
        f"| decode output tokens/s per node | {result.decode_tokens_per_s_per_node:,.0f} |",
        f"| prefill of a mean prompt | {result.prefill_service_s * 1e3:.1f} ms |",
        f"| prefill prompt tokens/s per node | {result.prefill_tokens_per_s_per_node:,.0f} |",
        f"| prefill utilization allowed by TTFT p99 | {result.prefill_max_utilization:.1%} |",
        f"| KV transfer of a mean prompt | {result.transfer_s * 1e3:.1f} ms |",
        f"| **prefill nodes** | **{result.prefill_nodes}** |",
        f"| **decode nodes** | **{result.decode_nodes}** |",
        f"| P:D | {result.pd_ratio:.2f} |",
        f"| colocated nodes at the same SLOs | {result.colocated_nodes} "
        f"(chunk {result.colocated_chunk_tokens}) |",
    ]
    return "\n".join(lines + [f"note: {n}" for n in result.notes])


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=float) + "\n")


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())
