"""The demo's numbers per task and arm, summarised over seeds with the study's statistics, and its
table (aligned text or markdown) and CSV.

Every value is in percent of the task's metric (top-1, mAP@0.5, mIoU). An arm's runs are paired with
the control's by seed (the arms of seed ``s`` start from the same baseline checkpoint and train with seed
``s``), and with the baseline's of the same seed, or with the one shared baseline where there is one.
"""

import csv
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refvision.app.study.statistics import Paired, Summary, paired, summarize
from refvision.utils.text_table import render_table

BASELINE, CONTROL, REFCONV = "baseline", "control", "refconv"
ARM_LABELS = {BASELINE: "baseline", CONTROL: "control", REFCONV: "RefConv"}


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """One finished run: ``test`` its final test metric; ``start`` its validation metric before the first
    training step (an arm) or its best validation metric (the baseline: the value its arms start from);
    ``lowest`` the lowest validation metric after the first step (NaN for the baseline)."""

    seed: int
    test: float
    start: float
    lowest: float


@dataclasses.dataclass(frozen=True)
class ArmStats:
    """One arm of one task over its seeds. ``vs_baseline``: test ``arm - baseline`` by seed (None for the
    baseline); ``vs_control``: test ``RefConv - control`` by seed (RefConv only)."""

    arm: str
    runs: tuple[SeedRun, ...]
    test: Summary
    start: Summary
    lowest: Summary | None
    vs_baseline: Paired | None
    vs_control: Paired | None

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(r.seed for r in self.runs)


def arm_stats(runs: Mapping[str, list[SeedRun]]) -> dict[str, ArmStats]:
    """:class:`ArmStats` of ``baseline``, ``control`` and ``refconv`` from their finished runs (every arm
    with at least one run); differences are taken over the seeds both sides finished."""

    def by_seed(arm: str) -> dict[int, SeedRun]:
        return {r.seed: r for r in runs.get(arm, [])}

    def compare(arm: str, other: str) -> Paired | None:
        mine, theirs = by_seed(arm), by_seed(other)
        if other == BASELINE and len(theirs) == 1:  # a shared baseline: the start of every seed
            theirs = dict.fromkeys(mine, next(iter(theirs.values())))
        common = sorted(mine.keys() & theirs.keys())
        if not common:
            return None
        return paired([mine[s].test for s in common], [theirs[s].test for s in common])

    out = {}
    for arm in (BASELINE, CONTROL, REFCONV):
        seeded = sorted(runs.get(arm, []), key=lambda r: r.seed)
        if not seeded:
            continue
        lowest = [r.lowest for r in seeded if not math.isnan(r.lowest)]
        out[arm] = ArmStats(
            arm,
            tuple(seeded),
            summarize([r.test for r in seeded]),
            summarize([r.start for r in seeded]),
            summarize(lowest) if lowest else None,
            None if arm == BASELINE else compare(arm, BASELINE),
            compare(REFCONV, CONTROL) if arm == REFCONV else None,
        )
    return out


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One task's results and where they come from.

    ``arms`` maps ``baseline`` / ``control`` / ``refconv`` to their :class:`ArmStats`; ``params`` /
    ``flops`` are ``(baseline, RefConv deploy, RefConv train form)`` (the train form with its training-only
    refocusing weights); ``max_abs_diff`` the largest output gap between RefConv's train and deploy forms
    over its seeds; ``images`` the ``(train, val, test)`` split sizes; ``epochs`` ``(baseline, arms)``;
    ``recipe`` how the arms continue (learning rate, warm-up, RefConv init)."""

    task: str
    label: str
    arms: Mapping[str, ArmStats]
    params: tuple[int, int, int]
    flops: tuple[int, int, int]
    max_abs_diff: float
    seconds: float
    model: str
    data: str
    input_size: str
    images: tuple[int, int, int]
    epochs: tuple[int, int]
    recipe: str


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def mean_std(s: Summary | None) -> str:
    """``"mean ± std"`` in points (``"-"`` for none; ``mean`` alone for one value)."""
    if s is None:
        return "-"
    return _num(s.mean) if s.n < 2 else f"{_num(s.mean)} ± {_num(s.std)}"


def difference(p: Paired | None) -> str:
    """``"+d [low, high]"``, the mean paired difference and its 95% CI (``"-"`` for none)."""
    if p is None:
        return "-"
    return f"{p.mean_diff:+.2f}" + ("" if math.isnan(p.ci_low) else f" [{p.ci_low:+.2f}, {p.ci_high:+.2f}]")


RESULT_HEADER = (
    "task",
    "arm",
    "seeds",
    "val at start",
    "lowest val after",
    "test mean ± std",
    "Δ vs baseline [95% CI]",
    "Δ RefConv − control [95% CI]",
    "paired t p",
    "Wilcoxon p",
    "params / FLOPs",
    "max |Δ| train vs deploy",
)


def result_lines(row: DemoRow) -> list[tuple[str, ...]]:
    """The table lines of one task, one per arm: the baseline's "val at start" is its best val (where
    the arms start); an arm's is its val before its first training step."""
    lines = []
    for arm, stats in row.arms.items():
        contrast = stats.vs_control
        params, flops = (row.params[0], row.flops[0]) if arm != REFCONV else (row.params[1], row.flops[1])
        lines.append(
            (
                f"{row.task} ({row.label})",
                ARM_LABELS[arm],
                " ".join(map(str, stats.seeds)),
                ("best " if arm == BASELINE else "") + mean_std(stats.start),
                mean_std(stats.lowest),
                mean_std(stats.test),
                difference(stats.vs_baseline),
                difference(contrast),
                _p(contrast.t_test_p) if contrast else "-",
                _p(contrast.wilcoxon_p) if contrast else "-",
                f"{params:,} / {flops:,}" + (" (deploy)" if arm == REFCONV else ""),
                f"{row.max_abs_diff:.2e}" if arm == REFCONV else "-",
            )
        )
    return lines


PROVENANCE_HEADER = (
    "task",
    "model",
    "input",
    "images train / val / test",
    "epochs baseline / arms",
    "arms continue with",
    "RefConv train form params / FLOPs",
    "time s",
    "data",
)


def provenance_line(row: DemoRow) -> tuple[str, ...]:
    return (
        row.task,
        row.model,
        row.input_size,
        " / ".join(str(n) for n in row.images),
        f"{row.epochs[0]} / {row.epochs[1]}",
        row.recipe,
        f"{row.params[2]:,} / {row.flops[2]:,}",
        f"{row.seconds:.0f}",
        row.data,
    )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = [header, tuple("---" for _ in header), *rows]
        return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)
    return render_table(header, rows)


def format_rows(rows: list[DemoRow], markdown: bool = False) -> str:
    """The demo's result table (aligned text, or markdown), then its provenance table."""
    results = [line for row in rows for line in result_lines(row)]
    provenance = [provenance_line(row) for row in rows]
    return _table(RESULT_HEADER, results, markdown) + "\n\n" + _table(PROVENANCE_HEADER, provenance, markdown)


RESULT_COLUMNS = (
    "task",
    "metric",
    "arm",
    "n",
    "seeds",
    "test_per_seed",
    "test_mean",
    "test_std",
    "test_ci95_low",
    "test_ci95_high",
    "start_per_seed",
    "start_mean",
    "start_std",
    "lowest_mean",
    "lowest_std",
    "vs_baseline_mean",
    "vs_baseline_ci95_low",
    "vs_baseline_ci95_high",
    "vs_control_mean",
    "vs_control_ci95_low",
    "vs_control_ci95_high",
    "paired_t_p",
    "wilcoxon_p",
    "statistics_note",
    "params",
    "flops",
    "max_abs_diff",
    "model",
    "input_size",
    "train_images",
    "val_images",
    "test_images",
    "baseline_epochs",
    "arm_epochs",
    "recipe",
    "seconds",
    "data",
)
"""``demo-results.csv``: one record per task and arm, in percent, full precision. ``start``: the baseline's
best val, an arm's val at step 0; ``vs_*``: paired differences (arm - baseline, RefConv - control);
``params`` / ``flops``: the baseline's, RefConv's deploy form's on its row; ``seconds``: the task's."""


def result_records(row: DemoRow) -> list[dict[str, Any]]:
    """``row`` as :data:`RESULT_COLUMNS` records, one per arm (empty where not applicable)."""
    records = []
    for arm, s in row.arms.items():
        b, c = s.vs_baseline, s.vs_control
        params, flops = (row.params[1], row.flops[1]) if arm == REFCONV else (row.params[0], row.flops[0])
        values = (
            row.task,
            row.label,
            arm,
            s.test.n,
            " ".join(map(str, s.seeds)),
            " ".join(repr(r.test) for r in s.runs),
            s.test.mean,
            s.test.std,
            s.test.ci_low,
            s.test.ci_high,
            " ".join(repr(r.start) for r in s.runs),
            s.start.mean,
            s.start.std,
            s.lowest.mean if s.lowest else "",
            s.lowest.std if s.lowest else "",
            b.mean_diff if b else "",
            b.ci_low if b else "",
            b.ci_high if b else "",
            c.mean_diff if c else "",
            c.ci_low if c else "",
            c.ci_high if c else "",
            c.t_test_p if c else "",
            c.wilcoxon_p if c else "",
            c.note if c else "",
            params,
            flops,
            row.max_abs_diff if arm == REFCONV else "",
            row.model,
            row.input_size,
            *row.images,
            *row.epochs,
            row.recipe,
            round(row.seconds, 1),
            row.data,
        )
        records.append(dict(zip(RESULT_COLUMNS, values, strict=True)))
    return records


def save_results(rows: list[DemoRow], root: Path, note: str, explanation: str) -> tuple[Path, Path]:
    """Write ``root/demo-results.md`` (tables, ``explanation``, ``note``) and ``root/demo-results.csv``."""
    markdown, table = root / "demo-results.md", root / "demo-results.csv"
    markdown.write_text(f"# refvision demo\n\n{format_rows(rows, markdown=True)}\n\n{explanation}\n\n{note}\n")
    with table.open("w", newline="") as file:
        writer = csv.DictWriter(file, RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerows(result_records(row))
    return markdown, table
