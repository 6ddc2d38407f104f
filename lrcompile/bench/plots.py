"""PNG plots of measured times and memory against sequence length n, log-log (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

GIB = 2**30


def memory_plot_path(path: str) -> str:
    target = Path(path)
    return str(target.with_name(f"{target.stem}_memory{target.suffix or '.png'}"))


def plot_times(results: list[dict], path: str) -> None:
    """Forward+backward time vs n, log-log: one row of panels per configuration, one column per mask."""
    plot_lines(_panels(results, lambda r: r["total_s"]), path, "forward + backward (s)", _machine_title(results))


def plot_memory(results: list[dict], path: str) -> None:
    """Peak memory of forward+backward vs n, log-log, laid out as plot_times."""
    plot_lines(_panels(results, lambda r: None if r["peak_bytes"] is None else r["peak_bytes"] / GIB), path,
               "peak memory of fwd+bwd above inputs (GiB)", _machine_title(results))


def _panels(results, value):
    """[[(title, {method: [(n, value)]}) per mask] per configuration], skipped rows left out."""
    grid = []
    for result in results:
        settings, row_panels = result["settings"], []
        for causal in settings["causal"]:
            lines = {method: [(r["n"], value(r)) for r in result["rows"]
                              if r["method"] == method and r["causal"] == causal and not r["skipped"]
                              and value(r) is not None]
                     for method in settings["methods"]}
            title = (f"{'causal' if causal else 'non-causal'}, d = {settings['head_dim']}, "
                     f"degree {settings['degree']}, {settings['heads']} heads, {settings.get('dtype', 'float32')}")
            row_panels.append((title, lines))
        grid.append(row_panels)
    return grid


def _machine_title(results):
    machine = results[0]["machine"]
    device = f"{machine['gpu']}, " if "gpu" in machine else ""
    return f"{device}{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}, {machine['date']}"


def plot_lines(grid: list[list[tuple[str, dict]]], path: str, ylabel: str, suptitle: str) -> None:
    """Log-log lines against sequence length n. grid[row][column] = (title, {label: [(n, y)]});
    a label keeps its colour in every panel."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'lrcompile[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for row in grid for _, lines in row for label in lines))
    columns = max(len(row) for row in grid)
    figure, axes = plt.subplots(len(grid), columns, figsize=(6 * columns, 4.2 * len(grid)), squeeze=False)
    for row_axes, row in zip(axes, grid):
        for axis, (title, lines) in zip(row_axes, row):
            for label, points in lines.items():
                if points:
                    axis.plot(*zip(*points), marker="o", label=label, color=f"C{labels.index(label)}")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("sequence length n")
            axis.set_ylabel(ylabel)
            axis.set_title(title)
            axis.grid(True, which="both", alpha=0.3)
            if axis.lines:
                axis.legend()
        for axis in row_axes[len(row):]:
            axis.set_visible(False)
    figure.suptitle(suptitle, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
