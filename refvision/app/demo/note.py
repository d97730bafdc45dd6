"""The note the demo prints under its table: what this run's numbers show, written from them.

Per task: where each arm started against the baseline (its val before the first step against the
baseline's best val), how low it fell after the switch, whether it recovered to the baseline's test
metric (the paired difference's 95% CI above, below or around 0), and RefConv against the control
(the paired difference, its CI and the named p-values); when RefConv loses, what the step-0 and lowest
values say about why.
"""

import math

from refvision.app.demo.results import BASELINE, CONTROL, REFCONV, ArmStats, DemoRow, difference
from refvision.app.study.statistics import Paired

SAME_START = 0.05
"""Step-0 and baseline val closer than this (points) read as equal: the conversion kept the function."""


def _pts(value: float) -> str:
    return f"{value:.1f}"


def _side(p: Paired) -> int:
    """+1: the 95% CI lies above 0; -1: below; 0: it contains 0 (or there is none, one seed)."""
    if math.isnan(p.ci_low):
        return 0
    return 1 if p.ci_low > 0 else -1 if p.ci_high < 0 else 0


def _start_clause(arm: ArmStats, baseline: ArmStats) -> str:
    start, base = arm.start.mean, baseline.start.mean
    gap = start - base
    if abs(gap) < SAME_START:
        kept = f"started at the baseline's val ({_pts(start)} = {_pts(base)})"
    else:
        side = "below" if gap < 0 else "above"
        kept = f"started {_pts(abs(gap))} {side} the baseline's val ({_pts(start)} vs {_pts(base)})"
    if arm.lowest is not None and arm.lowest.mean < start - SAME_START:
        kept += f", fell to {_pts(arm.lowest.mean)} after the switch"
    return kept


def _recovery_clause(arm: ArmStats) -> str:
    p = arm.vs_baseline
    if p is None:
        return "has no baseline of the same seed to compare with"
    d = difference(p)
    if math.isnan(p.ci_low):
        return f"ended {d} against the baseline's test (one seed: no interval)"
    side = _side(p)
    if side < 0:
        return f"ended below the baseline's test, {d}: it did not recover"
    if side > 0:
        return f"ended above the baseline's test, {d}"
    return f"ended level with the baseline's test, {d} (the interval includes 0)"


def _contrast(refconv: ArmStats, control: ArmStats, epochs: int) -> str:
    p = refconv.vs_control
    if p is None:
        return "RefConv and the control share no seed: no paired difference."
    tests = f"paired t p = {_p(p.t_test_p)}, Wilcoxon signed-rank p = {_p(p.wilcoxon_p)}"
    if p.note:
        tests += f"; {p.note}"
    d = difference(p)
    if math.isnan(p.ci_low):
        return f"RefConv − control: {d} from one seed, no interval or test: too few seeds to tell."
    side = _side(p)
    if side > 0:
        return f"RefConv beat the control: {d} ({tests})."
    if side == 0:
        return (
            f"RefConv − control: {d} ({tests}); the interval includes 0: "
            f"these {p.n} seeds do not separate RefConv from the control."
        )
    start_gap = refconv.start.mean - control.start.mean
    if start_gap < -SAME_START:
        why = (
            f"it started {_pts(-start_gap)} below the control at step 0 ({_pts(refconv.start.mean)} vs "
            f"{_pts(control.start.mean)}: its conversion did not keep the baseline's function) and did not "
            f"make that up in {epochs} epochs"
        )
    elif (
        refconv.lowest is not None
        and control.lowest is not None
        and refconv.lowest.mean < control.lowest.mean - SAME_START
    ):
        why = (
            f"both started alike ({_pts(refconv.start.mean)} vs {_pts(control.start.mean)}), but RefConv fell "
            f"further after the switch (lowest val {_pts(refconv.lowest.mean)} vs {_pts(control.lowest.mean)}): "
            "the loss comes from training after the switch, not from the conversion"
        )
    else:
        why = (
            f"both started alike ({_pts(refconv.start.mean)} vs {_pts(control.start.mean)}) and fell no further "
            "than the control: it trained to a lower end point"
        )
    return f"RefConv lost to the control: {d} ({tests}); {why}."


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def task_note(row: DemoRow) -> str:
    """The note's paragraph for one task (needs the baseline; says what it lacks otherwise)."""
    baseline = row.arms.get(BASELINE)
    if baseline is None:
        return f"{row.task}: no finished baseline, nothing to compare."
    n = baseline.test.n
    lines = [
        f"{row.task} ({row.label}, {n} seed{'s' if n != 1 else ''}): the baseline's best val "
        f"{_pts(baseline.start.mean)}, test {_pts(baseline.test.mean)}."
    ]
    for arm, name in ((CONTROL, "control"), (REFCONV, "RefConv")):
        stats = row.arms.get(arm)
        if stats is not None:
            lines.append(f"- {name} {_start_clause(stats, baseline)}; {_recovery_clause(stats)}.")
    if CONTROL in row.arms and REFCONV in row.arms:
        lines.append("- " + _contrast(row.arms[REFCONV], row.arms[CONTROL], row.epochs[1]))
    return "\n".join(lines)


def demo_note(rows: list[DemoRow]) -> str:
    """The whole note: one paragraph per task, from its numbers only."""
    return "What this run shows (points of each task's metric; Δ with its 95% CI):\n\n" + "\n\n".join(
        task_note(row) for row in rows
    )
