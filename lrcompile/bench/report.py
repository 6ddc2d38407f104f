"""The report of a `lrcompile bench` run as Markdown: the per-row table, slopes, crossovers, rate ratios.

It reads the result dictionary `lrcompile.bench.summarise` returns (also what --json writes), so a
saved run can be reported again without measuring.
"""

from __future__ import annotations

SLOPE_FROM_N = 4096  # below it, fixed per-call overheads bend the log-log line


def mask_name(causal: bool) -> str:
    return "causal" if causal else "non-causal"


def _milliseconds(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(numerator, denominator):
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def table_lines(result: dict) -> list[str]:
    """The per-row table as Markdown (also readable on a terminal)."""
    rows = result["rows"]
    methods = result["settings"]["methods"]
    sdpa = {(r["n"], r["causal"]): r for r in rows if r["method"] == "sdpa" and r["total_s"] is not None}
    matmul_rate = result["matmul"]["gflops"]
    with_memory = result["settings"]["memory"]
    with_bytes = result["settings"].get("device") == "cuda"  # on a GPU, bandwidth may bound the low-rank path
    header = ["n", "mask", "method", "forward ms", "speed-up vs sdpa", "fwd+bwd ms", "speed-up vs sdpa",
              "GFLOP/s (model)", "of matmul rate", "first call s"] + (["peak MiB"] if with_memory else []) + (
        ["GB/s (byte model)"] if with_bytes else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["causal"], r["n"], methods.index(r["method"]))):
        mask = mask_name(r["causal"])
        if r["skipped"]:
            cells = [str(r["n"]), mask, r["method"], r["skipped"]] + [""] * (len(header) - 4)
        else:
            base = sdpa.get((r["n"], r["causal"]), {})
            rate = r["flops"] / r["total_s"] / 1e9
            cells = [str(r["n"]), mask, r["method"], _milliseconds(r["forward_s"]),
                     _ratio(base.get("forward_s"), r["forward_s"]), _milliseconds(r["total_s"]),
                     _ratio(base.get("total_s"), r["total_s"]), f"{rate:.1f}", f"{rate / matmul_rate:.0%}",
                     "-" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"]
            if with_memory:
                cells.append("-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}")
            if with_bytes:
                cells.append(f"{r['bytes'] / r['total_s'] / 1e9:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_report(result: dict) -> str:
    """The report as Markdown: what was measured, the table, slopes, crossovers, rate ratios."""
    settings = result["settings"]
    matmul = result["matmul"]
    lines = [
        f"Attention, {settings['describe']}. Median of {settings['repeats']} interleaved runs after "
        f"{settings['warmup']} warm-up; \"forward\" is the forward of a training step, \"fwd+bwd\" the whole "
        f"step; speed-up vs sdpa = sdpa's time / the method's, same run. Matmul rate ({matmul.get('dtype', 'float32')} "
        f"torch.mm {matmul['size']}^3, measured): **{matmul['gflops']:.1f} GFLOP/s**. GFLOP/s (model) = FLOPs of "
        f"forward + backward by the FLOP model (lrcompile.math.flops) / measured fwd+bwd time"
        + ("; GB/s (byte model) = least memory traffic of forward + backward (cost.exact_bytes, cost.lowrank_bytes: "
           "O(n d) rows and the states, no n x n scores) / the same time." if settings.get("device") == "cuda" else "."),
        "",
        *table_lines(result),
        "",
        "- first call s: compile + one step (compiled methods).",
    ]
    for mask, fuses in result["inductor_fuses_math_attention"].items():
        lines.append(f"- inductor, {mask}: Inductor {'replaces' if fuses else 'does not replace'} the math spelling "
                     f"by SDPA (its fuse_attention pass){'' if fuses else ', so it materialises the n x n weights'}.")
    lines += [f"- {r['method']} n = {r['n']} {mask_name(r['causal'])}: memory {r['memory_note']}"
              for r in result["rows"] if r["memory_note"]]
    lines += ["", *slope_table_lines(result), "", "Crossover with sdpa, measured: the n from which the method stays "
              "faster, interpolated in log-log between the measured points around it.", ""]
    for c in result["crossovers"]:
        phase = "fwd+bwd" if c["phase"] == "total_s" else "forward"
        lines.append(f"- {c['method']}, {mask_name(c['causal'])}, {phase}: {c['text']}")
    for p in result["predicted_crossovers"]:
        ratio = "not calibrated" if p["rate_ratio"] is None else f"rate ratio {p['rate_ratio']:.3g}"
        lines.append(f"- predicted by the cost model in use (lrcompile.compile.cost_model, {ratio}), {mask_name(p['causal'])}, "
                     f"fwd+bwd: " + ("never" if p["n"] is None else f"n = {p['n']}"))
    if result.get("calibration"):
        lines.append(f"- cost model's calibration: {result['calibration']}")
    if result["rate_ratios"]:
        lines += ["", "Achieved FLOP rate of low-rank over sdpa's (FLOP model / measured fwd+bwd time, at the "
                      "largest n both measured; the cost model's calibration is this ratio near the crossover):", ""]
        lines += [f"- {r['method']}, {mask_name(r['causal'])}, n = {r['n']}: {r['ratio']:.2f}"
                  for r in result["rate_ratios"]]
    return "\n".join(lines)


def slope_table_lines(result: dict) -> list[str]:
    """Slope of log(time) vs log(n) per method, mask and phase, as a Markdown table."""
    settings = result["settings"]
    by_key = {(s["method"], s["causal"], s["phase"]): s for s in result["slopes"]}
    columns = [(causal, phase) for causal in settings["causal"] for phase in ("total_s", "forward_s")]
    header = ["method"] + [f"{mask_name(c)} {'fwd+bwd' if p == 'total_s' else 'forward'}" for c, p in columns]
    lines = [f"Slope of log(time) vs log(n), least squares over the measured n >= {SLOPE_FROM_N} (2 = quadratic, "
             f"1 = linear; '-': fewer than two such n):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in settings["methods"]:
        cells = [method]
        for causal, phase in columns:
            entry = by_key[method, causal, phase]
            cells.append("-" if entry["slope"] is None else f"{entry['slope']:.2f} ({entry['points']} n)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
