"""Memory saved against time paid, one point per (model, strategy): the picture a user decides by."""

from __future__ import annotations


def plot_tradeoff(rows: list[dict], path: str) -> bool:
    """Write the scatter to ``path``; False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "osD^v<>pP*X"
    strategies = sorted({r["strategy"] for r in rows})
    models = sorted({r["model"] for r in rows})
    colors = plt.get_cmap("tab10")
    for row in rows:
        # The byte count: exact at any size, where RSS misses small tensors served from the heap.
        x, y = row.get("time_ratio"), row.get("saved_ratio") or row.get("act_ratio")
        if x is None or y is None:
            continue
        ax.scatter(x, y, marker=markers[strategies.index(row["strategy"]) % len(markers)],
                   color=colors(models.index(row["model"]) % 10), s=50)
    for i, s in enumerate(strategies):
        ax.scatter([], [], marker=markers[i % len(markers)], color="gray", label=s)
    for i, m in enumerate(models):
        ax.plot([], [], color=colors(i % 10), lw=4, label=m)
    ax.axvline(1.0, color="lightgray", zorder=0)
    ax.axhline(1.0, color="lightgray", zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("step time / plain PyTorch (lower is better)")
    ax.set_ylabel("activations kept for backward: plain / strategy (higher is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Activation memory saved vs step time paid")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
