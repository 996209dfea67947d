"""Plots of the evaluation results (matplotlib, headless; matplotlib comes with the `eval` extra)."""

from __future__ import annotations

import importlib.util

from ouro_jax.paths import as_path

PLOTS_NEED_EXTRA = "no plots: matplotlib is not installed (pip install 'ouro_jax[eval]')"

METRIC_LABELS = {"ce": "cross-entropy (nats/token, lower is better)", "accuracy": "exact-match accuracy"}


def plotting_available() -> bool:
    """Whether matplotlib (the `eval` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_sweep(result: dict, path: str | None = None, *, title: str = "", ax=None):
    """Quality vs mean realized depth: static exit at each step and each gate's Q-exit curve.

    Draws into `ax` (e.g. a notebook's pyplot axes) or a new standalone figure (no GUI backend needed),
    saved to `path` when given; returns the figure."""
    if ax is None:
        from matplotlib.figure import Figure  # optional dependency: only plotting needs it

        fig = Figure(figsize=(6.4, 4.2), dpi=100)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    for name, points in result["curves"].items():
        x = [p["mean_depth"] for p in points]
        y = [p["value"] for p in points]
        if name == "static":
            ax.plot(x, y, "s-", color="black", label="static exit (fixed depth)")
            continue
        line, = ax.plot(x, y, "o--", label=f"Q-exit, {name.split(':', 1)[1]} gate")
        for p in points:
            if p["setting"] in (0.2, 0.5, 0.8, 0.95):
                ax.annotate(f"q={p['setting']:g}", (p["mean_depth"], p["value"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.set_xlabel(f"mean realized depth (recurrent steps; x {result['num_layers']} layer applications)")
    ax.set_ylabel(METRIC_LABELS.get(result["metric"], result["metric"]))
    ax.set_title(title or "quality vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        path = as_path(path)
        with path.open("wb") as f:  # local or an object store
            fig.savefig(f, format=path.suffix[1:] or "png")
    return fig
