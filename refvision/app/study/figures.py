"""The study's figures: the metric per seed per arm, and the validation curves per arm (matplotlib Agg)."""

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from refvision.app.study.statistics import Summary

_DPI = 110


def metric_figure(
    values: Mapping[str, Mapping[int, float]], summaries: Mapping[str, Summary], metric: str, reference: str
) -> Figure:
    """One column per arm (in ``values``' order): a dot per seed (``values[arm][seed]``), the same seed joined
    across arms by a faint line (the pairing the statistics use), the mean as a bar and its 95% CI."""
    arms = list(values)
    seeds = sorted({seed for per_seed in values.values() for seed in per_seed})
    fig = Figure(figsize=(1.6 + 1.3 * len(arms), 4.2), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = {seed: f"C{i % 10}" for i, seed in enumerate(seeds)}
    offsets = {seed: (i - (len(seeds) - 1) / 2) * min(0.06, 0.4 / max(1, len(seeds))) for i, seed in enumerate(seeds)}
    for seed in seeds:
        xs = [i + offsets[seed] for i, arm in enumerate(arms) if seed in values[arm]]
        ys = [values[arm][seed] for arm in arms if seed in values[arm]]
        ax.plot(xs, ys, color=colors[seed], alpha=0.25, linewidth=1)
        ax.scatter(xs, ys, color=colors[seed], s=28, zorder=3, label=f"seed {seed}")
    for i, arm in enumerate(arms):
        s = summaries[arm]
        ax.hlines(s.mean, i - 0.25, i + 0.25, color="black", linewidth=2, zorder=4)
        if np.isfinite(s.ci_low):
            ax.errorbar(
                i + 0.3, s.mean, yerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]], color="black", capsize=4, zorder=4
            )
    labels = [f"{arm}\n(reference)" if arm == reference else arm for arm in arms]
    ax.set_xticks(range(len(arms)), labels=labels)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per seed; bar: mean, whisker: 95% CI (t)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def curves_figure(
    curves: Mapping[str, Sequence[Mapping[int, float]]], metric: str, start_metric: str, baseline: str
) -> Figure:
    """Per arm, the mean over seeds of ``metric`` against the training step (``curves[arm]``: one
    ``{step: value}`` per seed, step 0 being ``start_metric`` where logged), with a band of +-1 std over
    seeds; only the steps every seed of the arm logged are drawn. The ``baseline`` stage, trained before
    the arms, gets a panel of its own on the left."""
    panels = [[baseline], [arm for arm in curves if arm != baseline]] if baseline in curves else [list(curves)]
    fig = Figure(figsize=(4.5 + 4 * len(panels), 4.2), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False, width_ratios=[1] * (len(panels) - 1) + [2])[0]
    styles = ("-", "--", "-.", ":")
    for ax, arms in zip(axes, panels, strict=True):
        for arm in arms:
            i = list(curves).index(arm)
            per_seed = curves[arm]
            steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
            if not steps:
                continue
            table = np.array([[c[step] for step in steps] for c in per_seed])
            mean = table.mean(axis=0)
            std = table.std(axis=0, ddof=1) if len(table) > 1 else np.zeros(len(steps))
            color, style = f"C{i % 10}", styles[i % len(styles)]
            ax.plot(steps, mean, style, marker="o", markersize=3, color=color, label=f"{arm} (n={len(table)})")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        if arms == [baseline]:
            ax.set_title(f"{baseline} (the start)", fontsize=10)
            ax.set_xlabel("training steps done")
        else:
            ax.axvline(0, color="grey", linewidth=0.8, linestyle=":")
            ax.set_title("arms, from the start", fontsize=10)
            ax.set_xlabel(f"training steps done (0: {start_metric}, before the first step)")
    axes[0].set_ylabel(metric)
    fig.suptitle(f"{metric} during training: mean over seeds, band +-1 std")
    return fig
