"""Summarising a study from its run folders: per-arm statistics, paired comparisons with the reference arm,
``study.md`` / ``study.csv``, the figures and TensorBoard HParams entries.

Only finished runs (``test_metrics.json``) count, so a study can be summarised while it runs. The final
metric is the test metric of the run's ``best.ckpt``; the step-0 metric (``val_start/<name>``) and the
validation curves come from the run's CSV logs (``lightning_logs/version_<n>/metrics.csv``; a resumed
fit's later version wins where two log the same step).
"""

import csv
import dataclasses
import io
import math
import re
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from refvision.app.study.config import BASELINE, Study, StudyError, plan
from refvision.app.study.figures import curves_figure, metric_figure
from refvision.app.study.runner import check_saved, read_result
from refvision.app.study.statistics import WILCOXON_MIN_N, Paired, Summary, paired, summarize
from refvision.outputs.figures import save_figure
from refvision.utils.atomic_file import open_atomically

COLUMNS = (
    "arm",
    "role",
    "n",
    "seeds",
    "mean",
    "std",
    "ci95_low",
    "ci95_high",
    "start_n",
    "start_mean",
    "start_std",
    "diff_n",
    "diff_mean",
    "diff_ci95_low",
    "diff_ci95_high",
    "paired_t_p",
    "wilcoxon_p",
    "note",
)
"""``study.csv``: per arm the metric's summary, the step-0 metric's (``start_*``), and against the reference
the paired differences (``diff_*``, arm - reference) with the paired t-test and Wilcoxon signed-rank p-values."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """A finished run: its final ``value`` of the study's metric, its step-0 metric ``start`` (NaN where the
    fit logged none: the baseline) and its validation ``curve`` ``{optimizer steps done: value}`` (0: ``start``)."""

    arm: str
    seed: int
    value: float
    start: float
    curve: dict[int, float]


@dataclasses.dataclass(frozen=True)
class ArmRow:
    """One arm's line of the study table; ``paired`` is None for the reference arm."""

    arm: str
    role: str
    seeds: tuple[int, ...]
    summary: Summary
    start: Summary | None
    paired: Paired | None


def read_logs(folder: Path, val_metric: str, start_metric: str) -> tuple[float, dict[int, float]]:
    """``(step-0 value, {steps done: val_metric})`` from the CSV logs under ``folder``, versions in order;
    the step-0 value is the curve's point 0."""
    start, curve = math.nan, {}
    versions = sorted(
        (int(m.group(1)), p / "metrics.csv")
        for p in (folder / "lightning_logs").glob("version_*")
        if (m := re.fullmatch(r"version_(\d+)", p.name)) and (p / "metrics.csv").is_file()
    )
    for _, path in versions:
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                if row.get(start_metric):
                    start = float(row[start_metric])
                if row.get(val_metric):  # logged at the index of the last step done, counting from 0
                    curve[int(row["step"]) + 1] = float(row[val_metric])
    if not math.isnan(start):
        curve[0] = start
    return start, dict(sorted(curve.items()))


def collect(study: Study) -> list[RunResult]:
    """The finished runs of ``study``, in plan order; a finished run made for other settings is refused."""
    results = []
    for run in plan(study):
        result = read_result(run)
        if result is None:
            continue
        check_saved(study, run)
        start, curve = read_logs(run.folder, study.val_metric, study.start_metric)
        results.append(RunResult(run.arm, run.seed, float(result["test"][study.metric]), start, curve))
    return results


def summarize_study(study: Study, results: list[RunResult]) -> list[ArmRow]:
    """One row per stage with finished runs: baseline (``start``), the reference, the other arms; each
    non-reference row compared with the reference over the seeds both finished."""
    by_arm: dict[str, dict[int, RunResult]] = {}
    for r in results:
        by_arm.setdefault(r.arm, {})[r.seed] = r
    reference = by_arm.get(study.reference, {})
    rows = []
    for arm in study.stages:
        runs = by_arm.get(arm)
        if not runs:
            continue
        seeds = tuple(sorted(runs))
        starts = [runs[s].start for s in seeds if not math.isnan(runs[s].start)]
        common = [s for s in seeds if s in reference]
        comparison = None
        if arm != study.reference and common:
            comparison = paired([runs[s].value for s in common], [reference[s].value for s in common])
        role = "start" if arm == BASELINE else "reference" if arm == study.reference else "arm"
        rows.append(
            ArmRow(
                arm,
                role,
                seeds,
                summarize([runs[s].value for s in seeds]),
                summarize(starts) if starts else None,
                comparison,
            )
        )
    return rows


def record(row: ArmRow) -> dict[str, Any]:
    """``row`` as a ``study.csv`` record (:data:`COLUMNS`), full precision; empty where not applicable."""
    s, st, p = row.summary, row.start, row.paired
    return dict(
        zip(
            COLUMNS,
            (
                row.arm,
                row.role,
                s.n,
                " ".join(str(seed) for seed in row.seeds),
                s.mean,
                s.std,
                s.ci_low,
                s.ci_high,
                st.n if st else 0,
                st.mean if st else "",
                st.std if st else "",
                p.n if p else "",
                p.mean_diff if p else "",
                p.ci_low if p else "",
                p.ci_high if p else "",
                p.t_test_p if p else "",
                p.wilcoxon_p if p else "",
                p.note if p else "",
            ),
        )
    )


def _num(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def table_rows(study: Study, rows: list[ArmRow]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Header and rows of the study table, as the terminal and ``study.md`` show it."""
    header = (
        "arm",
        "n",
        f"{study.start_metric} (step 0)",
        f"{study.metric} mean ± std",
        "95% CI",
        f"Δ vs {study.reference} [95% CI]",
        "paired t p",
        "Wilcoxon p",
        "note",
    )
    lines = []
    for row in rows:
        s, st, p = row.summary, row.start, row.paired
        label = f"{row.arm} ({row.role})" if row.role != "arm" else row.arm
        lines.append(
            (
                label,
                str(s.n),
                f"{_num(st.mean)} ± {_num(st.std)}" if st else "-",
                f"{_num(s.mean)} ± {_num(s.std)}",
                f"[{_num(s.ci_low)}, {_num(s.ci_high)}]",
                f"{p.mean_diff:+.4f} [{_num(p.ci_low)}, {_num(p.ci_high)}] (n={p.n})" if p else "-",
                _p(p.t_test_p) if p else "-",
                _p(p.wilcoxon_p) if p else "-",
                p.note if p else "",
            )
        )
    return header, lines


EXPLANATION = (
    "Runs are paired by seed: every arm of a seed starts from the same weights with the same seed. "
    "Δ is arm - reference per seed, averaged; 95% CIs are Student-t intervals (they assume roughly normal "
    "values, or differences). p-values are two-sided: the paired t-test (scipy.stats.ttest_rel) and the "
    "Wilcoxon signed-rank test (scipy.stats.wilcoxon, exact for small n without ties or zero differences; "
    f"with n < {WILCOXON_MIN_N} pairs its p-value cannot be below 0.05). step 0: the validation metric before "
    "the first training step (val_start/*), i.e. what the conversion kept of the start."
)


def markdown(study: Study, rows: list[ArmRow], results: list[RunResult]) -> str:
    """The text of ``study.md``: the study table, how to read it, and every run's numbers."""
    header, lines = table_rows(study, rows)

    def md(head: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
        return "\n".join(
            "| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |"
            for line in (head, tuple("---" for _ in head), *body)
        )

    runs = [(r.arm, str(r.seed), _num(r.start), _num(r.value)) for r in results]
    start = study.checkpoint or f"{BASELINE} trained per seed in {study.root / BASELINE}"
    return (
        f"# study {study.root}\n\nmetric: {study.metric}; seeds: {', '.join(map(str, study.seeds))}; "
        f"reference: {study.reference}; start: {start}\n\n{md(header, lines)}\n\n{EXPLANATION}\n\n"
        f"## runs\n\n{md(('arm', 'seed', study.start_metric, study.metric), runs)}\n"
    )


def write_hparams(study: Study, results: list[RunResult]) -> Path:
    """One TensorBoard HParams entry per run in ``<root>/hparams/<arm>_seed_<s>`` (arm and seed as
    hyper-parameters, the final and step-0 metrics as metrics); earlier entries are replaced."""
    folder = study.root / "hparams"
    shutil.rmtree(folder, ignore_errors=True)
    for r in results:
        metrics = {study.metric: r.value, **({study.start_metric: r.start} if not math.isnan(r.start) else {})}
        with SummaryWriter(str(folder / f"{r.arm}_seed_{r.seed}")) as writer:
            writer.add_hparams({"arm": r.arm, "seed": r.seed}, metrics, run_name=".")
    return folder


def write_summary(study: Study, rows: list[ArmRow], results: list[RunResult]) -> None:
    """Write ``study.md``, ``study.csv``, ``study_metric.png``, ``study_curves.png`` and the HParams entries
    of ``rows`` (from :func:`summarize_study`) and ``results`` into the study's root."""
    root = study.root
    with open_atomically(root / "study.md") as file:
        file.write(markdown(study, rows, results).encode())
    with open_atomically(root / "study.csv") as file:
        file.write(_csv_text(rows).encode())
    values = {row.arm: {r.seed: r.value for r in results if r.arm == row.arm} for row in rows}
    save_figure(
        metric_figure(values, {row.arm: row.summary for row in rows}, study.metric, study.reference),
        root / "study_metric.png",
    )
    curves = {row.arm: [r.curve for r in results if r.arm == row.arm and r.curve] for row in rows}
    save_figure(curves_figure(curves, study.val_metric, study.start_metric, BASELINE), root / "study_curves.png")
    write_hparams(study, results)


def aggregate(study: Study, console: Console | None = None) -> list[ArmRow]:
    """Summarise the finished runs of ``study``: print the table, write ``study.md``, ``study.csv``,
    ``study_metric.png``, ``study_curves.png`` and the HParams entries into its root."""
    results = collect(study)
    if not results:
        raise StudyError(f"root: {study.root} holds no finished run of this study yet")
    rows = summarize_study(study, results)
    root = study.root
    write_summary(study, rows, results)
    header, lines = table_rows(study, rows)
    table = Table(*header, title=f"refvision study: {study.metric}, {root}")
    for line in lines:
        table.add_row(*line)
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: wide enough for the table
            console = Console(width=220)
    console.print(table)
    console.print(EXPLANATION)
    console.print(
        f"saved: {root / 'study.md'}  {root / 'study.csv'}  {root / 'study_metric.png'}  {root / 'study_curves.png'}"
    )
    console.print(f"TensorBoard (runs and HParams): tensorboard --logdir {root}")
    return rows


def _csv_text(rows: list[ArmRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(record(row) for row in rows)
    return buffer.getvalue()
