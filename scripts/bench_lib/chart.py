"""The PNG beside a benchmark report: throughput (median, min-max bars) and server CPU per
request (nbdkit, with the daemon hatched) per workload."""

from .report import fmt_val, server_label


def draw(path, meta, summary, servers, workloads):
    """Throughput and CPU per request per workload, one bar per server, as a PNG at path.
    Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3
    nrows_w = (len(workloads) + ncols - 1) // ncols
    fig, axes = plt.subplots(2 * nrows_w, ncols, figsize=(5.2 * ncols, 2.2 + 0.42 * len(servers)
                                                          * 2 * nrows_w), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    col = {s: colors[i % len(colors)] for i, s in enumerate(servers)}
    ys = list(range(len(servers)))[::-1]
    names = [server_label(meta, s, plain=True) for s in servers]
    for i, w in enumerate(workloads):
        ax = axes[i // ncols][i % ncols]
        med = [summary[s][w.name].get("median") or 0 for s in servers]
        lo = [m - (summary[s][w.name].get("min") or 0) if m else 0
              for m, s in zip(med, servers, strict=False)]
        hi = [(summary[s][w.name].get("max") or 0) - m if m else 0
              for m, s in zip(med, servers, strict=False)]
        ax.barh(ys, med, xerr=[lo, hi], color=[col[s] for s in servers], capsize=2)
        ax.set_yticks(ys, names, fontsize=8)
        ax.set_title("%s (%s)" % (w.label, w.unit), fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        for y, m, h in zip(ys, med, hi, strict=False):
            if m:
                ax.text(m + h, y, " " + fmt_val(m, w.unit), va="center", fontsize=7)
        ax.margins(x=0.18)
    for i, w in enumerate(workloads):
        ax = axes[nrows_w + i // ncols][i % ncols]
        left = [0.0] * len(servers)
        for role, hatch in (("nbdkit", None), ("qsd", "//")):
            vals = [((summary[s][w.name].get("cpu_us_per_req") or {}).get(role) or 0)
                    for s in servers]
            ax.barh(ys, vals, left=left, color=[col[s] for s in servers], hatch=hatch,
                    edgecolor="white" if hatch else None, label=role)
            left = [a + b for a, b in zip(left, vals, strict=False)]
        ax.set_yticks(ys, names, fontsize=8)
        ax.set_title("%s: server CPU µs/request (hatched: qsd)" % w.label, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        for y, m in zip(ys, left, strict=False):
            if m:
                ax.text(m, y, " %.0f" % m, va="center", fontsize=7)
        ax.margins(x=0.15)
    for j in range(len(workloads), nrows_w * ncols):
        axes[j // ncols][j % ncols].axis("off")
        axes[nrows_w + j // ncols][j % ncols].axis("off")
    fig.suptitle("vblk benchmark %s — median of %d round(s), bars: min–max%s"
                 % (meta["timestamp"], meta["rounds"], " (quick)" if meta["quick"] else ""),
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
