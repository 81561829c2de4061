"""routing_sim.md and routing_sim.png from a run's result: the findings, the capacity tables,
every configuration, and p99 TTFT against the arrival rate."""

from __future__ import annotations

import math
import os
from pathlib import Path

from benchmarks.routing.routers import HASH_EPSILON, HASH_VNODES


def _row(m: dict) -> str:
    return (
        f"| {m['zipf']} | {m['replicas']} | {m['policy']} | {m['rate']:g} | {m['slot_hit']:.0%} | {m['cpu_hit']:.0%} | "
        f"{m['disk_loads_per_s']:.1f} | {m['installs_per_s']:.1f} | {m['ttft_p50_s']:.2f} | {m['ttft_p99_s']:.1f} | "
        f"{m['tokens_per_s_per_replica']:.0f} | {'yes' if m['stable'] else 'no'} |"
    )


HEADER = [
    "| Zipf | replicas | policy | req/s | slot hits | CPU hits | disk loads/s | slot fills/s | TTFT p50 s | p99 s | tok/s per replica | stable |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def _plural(count: int) -> str:
    return f"{count} replica{'s' if count > 1 else ''}"


def findings(result: dict) -> list[str]:
    """The paragraphs on replicas needed and where a replica's time goes, from the runs."""
    base, grid, setup, target = result["model"]["disk_s"], result["grid"], result["setup"], result["ttft_target_s"]
    cap = {(c["zipf"], c["policy"], c["replicas"]): c["max_rate"] for c in result["capacity"] if c["disk_s"] == base}
    zipf = 1.0 if 1.0 in grid["zipfs"] else grid["zipfs"][0]
    most = max(grid["replicas"])
    per_policy = "; ".join(f"{p}: " + ", ".join(f"{_plural(r)} {cap[(zipf, p, r)]:g}" for r in grid["replicas"]) for p in grid["policies"])
    best = max(grid["policies"], key=lambda p: cap[(zipf, p, most)])
    per = cap[(zipf, best, most)] / most
    sizing = (
        f"**Replicas needed.** For {setup['finetunes']:,} fine-tunes at Zipf {zipf} ({setup['prompt']} + {setup['output']} tokens a "
        f"request), the highest swept arrival rate (req/s) that keeps p99 TTFT under {target:g} s with bounded queues is — {per_policy}. "
    )
    if per > 0:
        sizing += (
            f"So with {best} routing {most} replicas carry {cap[(zipf, best, most)]:g} req/s ({per:.2f} a replica): a load of L req/s "
            f"needs about L / {per:.2f} replicas at that scale. Per-replica capacity grows with the replica count under affinity "
            f"routing, because the replicas' CPU tiers together ({most} x {setup['cpu']} = {most * setup['cpu']:,} deltas) partition the "
            f"fine-tunes instead of each caching the same popular ones; size at the scale you deploy."
        )
    else:
        sizing += f"No policy meets the target at {most} replicas at the lowest swept rate."
    out = [sizing]
    at = [m for m in result["runs"] if (m["disk_s"], m["zipf"], m["replicas"], m["policy"], m["rate"]) == (base, zipf, most, best, cap[(zipf, best, most)])]
    if at:
        m, share = at[0], at[0]["time_share"]
        out.append(
            f"**Where a replica's time goes** ({best}, {most} replicas, {m['rate']:g} req/s): {share.get('prefill', 0):.0%} in steps that "
            f"carry prompt tokens (eager, {result['model']['mix_ms']:.0f} ms more when sequences decode beside them), "
            f"{share.get('eager', 0) + share.get('capture', 0):.0%} in decode steps of a new batch composition (eager or capturing a graph), "
            f"{share.get('replay', 0):.0%} replaying graphs, the rest idle; {m['tokens_per_s_per_replica']:.0f} tokens/s a replica. "
            f"The delta loader: {m['disk_loads_per_s'] / most:.2f} disk reads/s a replica against at most {1 / base:.2f} "
            f"({base:.2f} s a read, one at a time); slot hits {m['slot_hit']:.0%}, CPU-tier hits {m['cpu_hit']:.0%}."
        )
        same = {r["policy"]: r for r in result["runs"] if (r["disk_s"], r["zipf"], r["replicas"], r["rate"]) == (base, zipf, most, m["rate"])}
        text = (
            "**Disk reads at the loaders** (same rate): deltas queued at a loader when a read starts, itself included (mean / max): "
            + "; ".join(f"{p} {r['loader_queue_mean']:.1f} / {r['loader_queue_max']}, p99 TTFT {r['ttft_p99_s']:.1f} s" for p, r in same.items()) + "."
        )
        if "multiplexed" in same and "hash" in same and same["multiplexed"]["loader_queue_mean"] > 1.3 * same["hash"]["loader_queue_mean"]:
            text += (
                " Multiplexed routing sends a fine-tune that no replica holds to the replicas holding the fewest models at that "
                "moment, so cold reads arrive at a few loaders together; hashing spreads them by name."
            )
        out.append(text)
    return out


def markdown(result: dict) -> str:
    model, disk, setup, grid = result["model"], result["disk_load"], result["setup"], result["grid"]
    base, target, most = model["disk_s"], result["ttft_target_s"], max(grid["replicas"])
    runs = [m for m in result["runs"] if m["disk_s"] == base]
    cap = {(c["disk_s"], c["zipf"], c["policy"], c["replicas"]): c["max_rate"] for c in result["capacity"]}
    check = model.get("check_e2e_zipf_row")
    lines = [
        f"# Routing {setup['finetunes']:,} fine-tunes over engine replicas (simulated; step costs measured on an H100)",
        "",
        (f"`{result['command']}` ({result['wall_s']:.0f} s on {os.cpu_count()} CPU cores). A discrete-event simulation; its "
        "assumptions are listed below and in the docstring of benchmarks/routing_sim.py. Poisson arrivals, Zipf popularity over the "
        f"fine-tunes; each replica is one engine with the engine's own rules (batch {setup['batch']}, {setup['slots']} GPU delta slots, "
        f"a CPU tier of {setup['cpu']} deltas, one disk loader, prefill chunk {setup['chunk']}); {setup['prompt']}-token prompts and "
        f"{setup['output']} generated tokens a request. Each configuration: {setup['warmup']:g} s warm-up, then {setup['seconds']:g} s "
        "measured; rates are for all replicas together."),
        "",
        *[paragraph + "\n" for paragraph in findings(result)],
        f"## Capacity: highest swept rate (req/s) that is stable with p99 TTFT <= {target:g} s",
        "",
        "Every lower swept rate passes too; 0: the lowest swept rate fails. Swept per replica: " + ", ".join(f"{r:g}" for r in grid["rates"]) + " req/s.",
        "",
        "| Zipf | policy | " + " | ".join(_plural(r) for r in grid["replicas"]) + " |",
        "|---|---|" + "---|" * len(grid["replicas"]),
    ]
    for zipf in grid["zipfs"]:
        for policy in grid["policies"]:
            lines.append(f"| {zipf} | {policy} | " + " | ".join(f"{cap[(base, zipf, policy, r)]:g}" for r in grid["replicas"]) + " |")
    disks = sorted({m["disk_s"] for m in result["runs"]})
    if len(disks) > 1:
        lines += ["", f"Sensitivity to the disk read time (Zipf 1.0, {_plural(most)}): highest passing rate, req/s.", "",
                  "| policy | " + " | ".join(f"{d:.2f} s a read" + (" (measured)" if d == base else "") for d in disks) + " |",
                  "|---|" + "---|" * len(disks)]
        for policy in ("multiplexed", "hash"):
            lines.append(f"| {policy} | " + " | ".join(f"{cap.get((d, 1.0, policy, most), math.nan):g}" for d in disks) + " |")
    key = [m for m in runs if m["zipf"] == 1.0 and m["replicas"] == most]
    if key:
        lines += ["", f"## Zipf 1.0, {_plural(most)}", "",
                  ("Slot / CPU hits: the request's delta was in a GPU slot / only in the CPU tier of the replica it was routed to, when "
                  "routed. Slot fills: CPU -> GPU copies. TTFT from arrival at the router."), ""]
        lines += HEADER + [_row(m) for m in key]
    lines += [
        "", "## The model and its inputs", "",
        f"- Decode step: {model['decode_step']}."
        + (f" Checked against e2e's Zipf row (B = {check['rows']}, {check['distinct']} distinct deltas): model {check['model_ms']} ms, "
           f"measured {check['measured_ms']} ms." if check else ""),
        f"- Prefill step: {model['prefill_step']}; prefill by prompts in the step (ms): {model['prefill_ms']}; the mixing cost is the "
        "mean of " + ", ".join(f"{k} = {v} ms" for k, v in model["mix_ms_derivations"].items()) + ".",
        f"- Disk -> CPU, measured on this machine: a {disk['gib']:.3f} GiB 7B-shaped delta written by `write_delta`, then read and "
        "verified (sha256) the way `read_weights` does, without pinning (no CUDA here); a shared VM, so other work on it adds noise. "
        f"Page cache dropped first: median {disk['cold_median_s']:.2f} s (runs " + ", ".join(f"{t:.2f}" for t in disk["cold_s"])
        + f"); cached: median {disk['warm_median_s']:.2f} s (runs " + ", ".join(f"{t:.2f}" for t in disk["warm_s"])
        + f"). The simulation uses {base:.2f} s a delta" + (" (given with --disk-s)" if base != disk["cold_min_s"] else
        ", the fastest cold read: reading and checksumming are mostly CPU work, so slower runs measure other work competing for "
        "this machine's 2 cores")
        + (f" (measured on {disk['layers_written']} of 32 layers, scaled)" if disk["scaled_by"] != 1 else "") + ".",
        f"- CPU -> GPU slot: {model['h2d_assumption']}: {model['h2d_ms']} ms, added to the step it precedes.",
        (f"- Multiplexed: a replica reports the deltas in its slots and CPU tier as its loaded models, with no delay; max_ongoing_requests "
        f"= {setup['max_ongoing']}. Hash: bounded loads, a replica full at max(B, ceil({1 + HASH_EPSILON:g} x mean ongoing)), "
        f"{HASH_VNODES} virtual nodes a replica."),
        ("- Stable: no request refused (1024 waiting at a replica) and the waiting requests grew by at most 8 per replica between "
        "the first and the last fifth of the window. TTFT percentiles count a request still waiting at the end with the time it "
        "had waited (a lower bound), so unstable rows show large, not exact, tails."),
        "- Not modelled: network, tokenisation, sampling, KV-cache limits, base-model requests, early stops, failures.",
        "", "## Every configuration", "",
    ]
    lines += HEADER + [_row(m) for m in runs]
    if len(disks) > 1:
        lines += ["", "With the disk read time changed (Zipf 1.0):", "", "| disk s " + HEADER[0], "|---" + HEADER[1]]
        lines += [f"| {m['disk_s']:.2f} " + _row(m) for m in result["runs"] if m["disk_s"] != base]
    lines += ["", "![p99 time to first token against the arrival rate, per routing policy](routing_sim.png)"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, grid = result["model"]["disk_s"], result["grid"]
    zipfs, counts = grid["zipfs"], [r for r in grid["replicas"] if r > 1] or grid["replicas"]
    figure, axes = plt.subplots(len(zipfs), len(counts), figsize=(4 * len(counts), 3.2 * len(zipfs)), squeeze=False)
    for row, zipf in enumerate(zipfs):
        for column, replicas in enumerate(counts):
            axis = axes[row][column]
            for index, policy in enumerate(grid["policies"]):
                color = f"C{index}"
                runs = [m for m in result["runs"] if (m["disk_s"], m["zipf"], m["replicas"], m["policy"]) == (base, zipf, replicas, policy)]
                axis.plot([m["rate"] for m in runs], [m["ttft_p99_s"] for m in runs], "-", color=color, label=policy)
                for m in runs:
                    axis.plot(m["rate"], m["ttft_p99_s"], "o" if m["stable"] else "x", color=color)
            axis.axhline(result["ttft_target_s"], color="grey", linestyle="--", linewidth=0.8)
            axis.set_yscale("log")
            axis.set_title(f"Zipf {zipf}, {_plural(replicas)}", fontsize=10)
            axis.set_xlabel("arrivals (req/s, all replicas)")
            axis.set_ylabel("p99 TTFT (s)")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="x: unstable", title_fontsize=8)
    figure.suptitle(f"{result['setup']['finetunes']:,} fine-tunes; replicas simulated with H100 step costs (Llama-2-7B); dashed: target")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True
