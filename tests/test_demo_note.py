"""The demo's note follows its numbers: constructed results in, the matching statements out."""

import math

import numpy as np
import pytest
from scipy import stats

from refvision.app.demo.note import demo_note, task_note
from refvision.app.demo.results import (
    RESULT_COLUMNS,
    DemoRow,
    SeedRun,
    arm_stats,
    format_rows,
    result_records,
)

NAN = math.nan


def _row(control: list[tuple[float, float, float]], refconv: list[tuple[float, float, float]]) -> DemoRow:
    """A classification row: one shared baseline (best val 60, test 60), the arms' ``(start, lowest, test)``
    per seed 0, 1, 2."""
    runs = {
        "baseline": [SeedRun(0, 60.0, 60.0, NAN)],
        "control": [SeedRun(s, test, start, low) for s, (start, low, test) in enumerate(control)],
        "refconv": [SeedRun(s, test, start, low) for s, (start, low, test) in enumerate(refconv)],
    }
    return DemoRow(
        task="classification",
        label="top-1 %",
        arms=arm_stats(runs),
        params=(100, 100, 150),
        flops=(1000, 1000, 1500),
        max_abs_diff=1e-6,
        seconds=10.0,
        model="ResNet (resnet18)",
        data="imagefolder /data",
        input_size="32x32",
        images=(192, 64, 64),
        epochs=(15, 6),
        recipe="AdamW lr 0.0005, no warm-up; RefConv init zeros",
    )


def _ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval, worked here from the t quantile."""
    d = np.asarray(diffs)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def test_significant_loss_from_a_lower_start() -> None:
    control = [(60.0, 55.0, 59.0), (60.0, 54.0, 60.0), (60.0, 56.0, 61.0)]
    refconv = [(54.0, 50.0, 50.0), (54.0, 49.0, 51.0), (54.0, 48.0, 52.5)]
    note = task_note(_row(control, refconv))
    mean, low, high = _ci([50 - 59, 51 - 60, 52.5 - 61])
    assert high < 0
    assert f"RefConv lost to the control: {mean:+.2f} [{low:+.2f}, {high:+.2f}]" in note
    assert f"paired t p = {stats.ttest_rel([50, 51, 52.5], [59, 60, 61]).pvalue:.3g}" in note
    assert f"Wilcoxon signed-rank p = {stats.wilcoxon([50, 51, 52.5], [59, 60, 61]).pvalue:.3g}" in note
    assert "it started 6.0 below the control at step 0 (54.0 vs 60.0" in note and "in 6 epochs" in note
    # Each arm against the baseline: the control is level with it, RefConv below it.
    mean, low, high = _ci([-1.0, 0.0, 1.0])
    assert "- control started at the baseline's val (60.0 = 60.0), fell to 55.0 after the switch; ended level" in note
    assert f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] (the interval includes 0)" in note
    assert "- RefConv started 6.0 below the baseline's val (54.0 vs 60.0)" in note
    assert "ended below the baseline's test" in note and "it did not recover" in note


def test_loss_with_the_same_start_points_at_training_after_the_switch() -> None:
    control = [(60.0, 58.0, 60.0), (60.0, 57.0, 61.0), (60.0, 58.0, 60.5)]
    refconv = [(60.0, 40.0, 55.0), (60.0, 42.0, 56.5), (60.0, 41.0, 55.0)]
    note = task_note(_row(control, refconv))
    assert "RefConv lost to the control" in note
    assert (
        "both started alike (60.0 vs 60.0), but RefConv fell further after the switch (lowest val 41.0 vs 57.7)" in note
    )
    assert "below the control at step 0" not in note


def test_overlapping_interval_separates_nothing() -> None:
    control = [(60.0, 58.0, 60.0), (60.0, 57.0, 61.0), (60.0, 58.0, 60.5)]
    refconv = [(60.0, 58.0, 59.0), (60.0, 57.0, 62.0), (60.0, 58.0, 61.0)]
    note = task_note(_row(control, refconv))
    mean, low, high = _ci([-1.0, 1.0, 0.5])
    assert low < 0 < high
    assert f"RefConv − control: {mean:+.2f} [{low:+.2f}, {high:+.2f}]" in note
    assert "the interval includes 0: these 3 seeds do not separate RefConv from the control" in note
    assert "lost" not in note and "beat" not in note


def test_gain_and_recovery_above_the_baseline() -> None:
    control = [(60.0, 59.0, 60.5), (60.0, 59.0, 59.5), (60.0, 59.5, 60.2)]
    refconv = [(60.0, 60.0, 65.0), (60.0, 60.0, 66.0), (60.0, 60.0, 67.0)]
    note = task_note(_row(control, refconv))
    assert "RefConv beat the control" in note
    assert "- RefConv started at the baseline's val (60.0 = 60.0); ended above the baseline's test, +6.00" in note
    assert "fell to" not in note.split("- RefConv")[1]  # its lowest val never went below its start


def test_one_seed_gives_no_interval_and_says_so() -> None:
    row = _row([(60.0, 58.0, 59.0)], [(60.0, 58.0, 58.0)])
    note = task_note(row)
    assert "RefConv − control: -1.00 from one seed, no interval or test: too few seeds to tell." in note
    assert "(one seed: no interval)" in note


def test_table_and_records_hold_the_same_numbers() -> None:
    control = [(60.0, 55.0, 59.0), (60.0, 54.0, 60.0), (60.0, 56.0, 61.0)]
    refconv = [(54.0, 50.0, 50.0), (54.0, 49.0, 51.0), (54.0, 48.0, 52.5)]
    row = _row(control, refconv)
    records = {r["arm"]: r for r in result_records(row)}
    assert all(list(r) == list(RESULT_COLUMNS) for r in records.values())
    assert records["refconv"]["test_mean"] == pytest.approx(np.mean([50, 51, 52.5]))
    assert records["refconv"]["start_mean"] == 54.0 and records["control"]["lowest_mean"] == 55.0
    assert records["refconv"]["vs_control_mean"] == pytest.approx(np.mean([-9, -9, -8.5]))
    assert records["baseline"]["vs_control_mean"] == "" and records["refconv"]["max_abs_diff"] == 1e-6
    table = format_rows([row])
    assert f"{np.mean([50, 51, 52.5]):.2f} ± {np.std([50, 51, 52.5], ddof=1):.2f}" in table
    assert "best 60.00" in table and demo_note([row]).startswith("What this run shows")
