"""The ``--validate`` and ``--sweep`` parts of ``pdserve simulate`` (see capacity.validate, capacity.knee)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from capacity.cli import write_json

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


VALIDATION_REQUESTS = 30  # per workload, unless --num-requests says otherwise


def default_cases(num_requests: int = VALIDATION_REQUESTS) -> list:
    """Azure conv and Mooncake conversation scaled to this machine: about 0.5 request/s, short prompts;
    the first ``num_requests`` of each (more: a p99 less decided by one request, a longer run)."""
    from capacity.validate import Case

    azure = str(SHARED_DATA / "azure" / "AzureLLMInferenceTrace_conv.csv")
    mooncake = str(SHARED_DATA / "mooncake" / "conversation_trace.jsonl")
    return [
        Case("azure-conv", azure, 0.1, 2.5, num_requests),
        Case("mooncake", mooncake, 0.02, 8.0, num_requests),
    ]


def run_checks(o: dict, spec, node, cost, out_dir: Path) -> None:
    blocks = o["kv_blocks"] or int(node.kv_budget_bytes(spec) // (spec.kv_bytes_per_token * o["block_size"]))
    if o["sweep"]:
        from capacity.knee import predicted_knees
        from cluster.bench.sweep import find_knee, parse_levels

        levels = parse_levels(o["sweep"])
        predicted = predicted_knees(
            cost,
            levels,
            int(o["input_len"]),
            int(o["output_len"]),
            blocks,
            o["block_size"],
            o["max_num_seqs"],
        )
        click.echo(f"cost model: {cost.describe()}")
        for name in ("planner", "simulator"):
            tokens = ", ".join(f"{r['output_tokens_per_s']:,.0f}" for r in predicted[name]["rows"])
            click.echo(f"{name}: knee {predicted[name]['knee']} (output tok/s at {levels}: {tokens})")
        if o["measured"]:
            measured = json.loads(Path(o["measured"]).read_text())
            knee = find_knee(measured["levels"], [r["output_tokens_per_s"] for r in measured["rows"]])
            predicted["measured"] = {"rows": measured["rows"], "knee": knee}
            click.echo(f"measured: knee {knee}")
        write_json(out_dir / "knee.json", {"cost_model": cost.describe(), **predicted})
    if o["validate"]:
        from capacity.validate import compare, report, run_sim, validate

        given = cost if o["calibration"] else None  # without one: fitted on the cluster itself first
        cost, reals, notes = validate(
            default_cases(o["num_requests"] or VALIDATION_REQUESTS),
            o["cluster_config"],
            out_dir,
            given,
            spec.kv_bytes_per_token,
        )
        if not o["calibration"]:
            cost.save(out_dir / "served-calibration.json")
        results = [
            (case, compare(real, run_sim(case, cost, blocks, o["block_size"]))) for case, real in reals
        ]
        text = report(results, cost.describe(), notes)
        (out_dir).mkdir(parents=True, exist_ok=True)
        (out_dir / "validation.md").write_text(text)
        click.echo(text)
