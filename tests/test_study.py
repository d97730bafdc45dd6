"""`refvision study`: the statistics against scipy and hand-worked numbers, the config checks, and a tiny
real study (2 arms x 2 seeds) with a `kill -9`, resume, skip, re-aggregation and an independent recomputation;
the step-0 metric of a function-preserving conversion equals the start checkpoint's validation metric."""

import csv
import hashlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fit_process import REPO, wait_for
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from refvision.app.cli import main
from refvision.app.demo.data import write_imagefolder
from refvision.app.lightning_cli import lightning_cli
from refvision.app.study.config import StudyError, make_study, plan, settings
from refvision.app.study.runner import start_of
from refvision.app.study.statistics import paired, summarize

# --- statistics ---------------------------------------------------------------------------------

X = [0.712, 0.695, 0.731, 0.688, 0.705, 0.722, 0.699]
Y = [0.701, 0.690, 0.715, 0.692, 0.698, 0.709, 0.689]


def test_summary_against_scipy() -> None:
    s = summarize(X)
    low, high = stats.t.interval(0.95, len(X) - 1, loc=np.mean(X), scale=stats.sem(X))
    assert (s.n, s.mean, s.std) == (7, pytest.approx(statistics.mean(X)), pytest.approx(statistics.stdev(X)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_paired_against_scipy() -> None:
    p = paired(X, Y)
    t = stats.ttest_rel(X, Y)
    interval = t.confidence_interval(0.95)
    assert p.n == 7 and p.mean_diff == pytest.approx(np.mean(np.subtract(X, Y)))
    assert (p.ci_low, p.ci_high) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert p.t_test_p == pytest.approx(t.pvalue)
    assert p.wilcoxon_p == pytest.approx(stats.wilcoxon(np.subtract(X, Y)).pvalue)
    assert p.note == ""


def test_paired_worked_by_hand() -> None:
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3) on 2 degrees of freedom. With 2 degrees
    # of freedom the t distribution has closed forms: F(t) = 1/2 + t / (2 sqrt(t^2 + 2)), so the two-sided
    # p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14); the 97.5% quantile is (2q - 1) / sqrt(2 q (1 - q)), q = 0.975.
    p = paired([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    quantile = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert p.mean_diff == 2.0
    assert p.t_test_p == pytest.approx(1 - math.sqrt(12 / 14), abs=1e-12)
    assert (p.ci_low, p.ci_high) == (
        pytest.approx(2 - quantile / math.sqrt(3), abs=1e-9),
        pytest.approx(2 + quantile / math.sqrt(3), abs=1e-9),
    )
    # Wilcoxon, exact: all 3 differences positive, W- = 0; 1 of the 2^3 equally likely sign patterns is as
    # extreme on each side: p = 2 / 8.
    assert p.wilcoxon_p == 0.25
    assert "Wilcoxon p >= 0.25, never < 0.05" in p.note


def test_wilcoxon_note_only_below_six_pairs() -> None:
    five, six = paired([1.0, 2, 3, 4, 5], [0.0] * 5), paired([1.0, 2, 3, 4, 5, 6], [0.0] * 6)
    assert five.wilcoxon_p == pytest.approx(2 / 2**5) and "0.0625" in five.note
    assert six.wilcoxon_p == pytest.approx(2 / 2**6) and six.note == ""
    same = paired([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(same.t_test_p) and math.isnan(same.wilcoxon_p) and "Δ all 0" in same.note


# --- config ---------------------------------------------------------------------------------------


def _values(root: Path, **changes: object) -> dict:
    values = {
        "root": str(root),
        "metric": "test/top1",
        "seeds": [0, 1],
        "configs": ["demo/classification.yaml"],
        "overrides": {"trainer.max_epochs": 2},
        "start": {"checkpoint": None, "baseline": {"configs": [], "overrides": {}}},
        "arms": {"control": {"configs": ["conv/control.yaml"]}, "zeros": {"configs": ["conv/refconv.yaml"]}},
        "reference": "control",
    }
    return {**values, **changes}


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"reference": "paper"}, "reference: 'paper' is not an arm"),
        ({"seeds": [1, 1]}, "seeds: [1, 1]"),
        ({"metric": "val/top1"}, "metric: 'val/top1'"),
        ({"arms": {"baseline": {}, "control": {}}}, "arms.baseline"),
        ({"arms": {"control": {"configs": ["conv/nothing.yaml"]}}}, "arms.control.configs: config conv/nothing.yaml"),
        ({"overrides": {"seed_everything": 3}}, "overrides.seed_everything: set by the study"),
        ({"start": {"checkpoint": "x.ckpt", "baseline": {}}}, "start: expected exactly one"),
        ({"start": {"checkpoint": "x.ckpt", "shared_baseline": True}}, "start.shared_baseline: true needs"),
    ],
)
def test_unusable_config_is_refused_naming_the_key(tmp_path: Path, changes: dict, named: str) -> None:
    with pytest.raises(StudyError, match=re.escape(named)):
        make_study(_values(tmp_path, **changes))


def test_plan_order_and_settings_name_changed_keys(tmp_path: Path) -> None:
    study = make_study(_values(tmp_path))
    runs = plan(study)
    assert [r.name for r in runs] == [f"{a}/seed_{s}" for a in ("baseline", "control", "zeros") for s in (0, 1)]
    changed = make_study(_values(tmp_path, overrides={"trainer.max_epochs": 3, "model.conv.init": "zeros"}))
    before, after = settings(runs[2], "a.ckpt"), settings(plan(changed)[2], "a.ckpt")
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == {
        "trainer.max_epochs",
        "model.init_args.conv.init",
    }
    assert before["model.init_args.conv.kind"] == "none" and before["seed_everything"] == 0


def test_shared_baseline_is_one_run_every_seed_starts_from(tmp_path: Path) -> None:
    start = {"checkpoint": None, "baseline": {}, "shared_baseline": True}
    study = make_study(_values(tmp_path, seeds=[3, 4, 5], start=start))
    runs = plan(study)
    assert [r.name for r in runs] == ["baseline/seed_3"] + [
        f"{a}/seed_{s}" for a in ("control", "zeros") for s in (3, 4, 5)
    ]
    # Every arm waits for that one baseline (index 0), whatever its seed; finished, it starts from its best.ckpt.
    for run in runs[1:]:
        with pytest.raises(
            StudyError, match=re.escape("starts from baseline/seed_3, which is not finished; run it first (--index 0")
        ):
            start_of(study, run)
    runs[0].folder.mkdir(parents=True)
    (runs[0].folder / "test_metrics.json").write_text(json.dumps({"best_checkpoint": "b.ckpt"}))
    assert {start_of(study, run) for run in runs[1:]} == {"b.ckpt"} and start_of(study, runs[0]) is None


# --- a real study -----------------------------------------------------------------------------

EPOCHS, STEPS = 2, 2
TINY = {
    "data.image_size": 32,
    "data.resize_size": 32,
    "data.batch_size": 8,
    "model.backbone": "timm:test_resnet",
    "model.image_size": 32,
    "trainer.limit_train_batches": STEPS,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
}


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """``(data, baseline best.ckpt, its validation top-1 as the fit recorded it)``."""
    root = tmp_path_factory.mktemp("study")
    data = write_imagefolder(root / "data", train_per_class=4, val_per_class=2, size=32)
    args = ["fit", "-c", "configs/demo/classification.yaml", "--data.root", str(data)]
    args += [f"--{k}={v}" for k, v in TINY.items()]
    cli = lightning_cli([*args, "--trainer.max_epochs=1", "--trainer.default_root_dir", str(root / "start")])
    callback = cli.trainer.checkpoint_callback
    return data, Path(callback.best_model_path), float(callback.best_model_score)


def _write_study(path: Path, root: Path, data: Path, checkpoint: Path, zeros_init: str = "zeros") -> Path:
    study = {
        "root": str(root),
        "metric": "test/top1",
        "seeds": [0, 1],
        "configs": ["demo/classification.yaml"],
        "overrides": {**TINY, "data.root": str(data), "trainer.max_epochs": EPOCHS},
        "start": {"checkpoint": str(checkpoint)},
        "arms": {
            "control": {"configs": ["conv/control.yaml"]},
            "refconv_zeros": {"configs": ["conv/refconv.yaml"], "overrides": {"model.conv.init": zeros_init}},
        },
        "reference": "control",
    }
    path.write_text(yaml.safe_dump(study))
    return path


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "hparams" not in p.parts and p.suffix != ".png" and p.name != "study.md"
    }


def _test_top1(run: Path) -> float:
    """The run's test top-1 from its test stage's own CSV log (not from the study's files)."""
    values = [
        float(row["test/top1"])
        for path in run.glob("test/lightning_logs/version_*/metrics.csv")
        for row in csv.DictReader(path.open())
        if row.get("test/top1")
    ]
    assert len(values) == 1, run
    return values[0]


@pytest.mark.slow
def test_study_kill_resume_skip_aggregate(tmp_path: Path, start: tuple[Path, Path, float], capsys) -> None:
    data, checkpoint, start_top1 = start
    root = tmp_path / "study"
    config = _write_study(tmp_path / "study.yaml", root, data, checkpoint)

    # kill -9 the first run (control, seed 0) in the middle of its fit.
    run0 = root / "control" / "seed_0"
    killed = subprocess.Popen(
        [sys.executable, "-m", "refvision", "study", "-c", str(config), "--index", "0"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = run0 / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.exists() or killed.poll() is not None, 300, "the first last.ckpt")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (run0 / "test_metrics.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] < EPOCHS * STEPS

    main(["study", "-c", str(config)])
    first = capsys.readouterr().out
    assert f"control/seed_0: fit, resuming from {last}" in first
    result0 = json.loads((run0 / "test_metrics.json").read_text())
    assert result0["resumed_from"] == str(last)
    final = torch.load(run0 / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == EPOCHS * STEPS

    runs = {(arm, seed): root / arm / f"seed_{seed}" for arm in ("control", "refconv_zeros") for seed in (0, 1)}
    # The switch made visible: both conversions keep the start's function, so the step-0 validation
    # equals the start checkpoint's own (recorded when the baseline fit chose it).
    for folder in runs.values():
        starts = [
            float(row["val_start/top1"])
            for path in folder.glob("lightning_logs/version_*/metrics.csv")
            for row in csv.DictReader(path.open())
            if row.get("val_start/top1")
        ]
        assert starts == [pytest.approx(start_top1, abs=1e-7)], folder

    # The aggregate equals a recomputation from the runs' own test logs.
    table = {row["arm"]: row for row in csv.DictReader((root / "study.csv").open())}
    values = {key: _test_top1(folder) for key, folder in runs.items()}
    for arm in ("control", "refconv_zeros"):
        mine = [values[(arm, 0)], values[(arm, 1)]]
        assert float(table[arm]["n"]) == 2
        assert float(table[arm]["mean"]) == pytest.approx(statistics.mean(mine), abs=1e-7)
        assert float(table[arm]["std"]) == pytest.approx(statistics.stdev(mine), abs=1e-7)
        assert float(table[arm]["start_mean"]) == pytest.approx(start_top1, abs=1e-7)
    diffs = [values[("refconv_zeros", s)] - values[("control", s)] for s in (0, 1)]
    assert float(table["refconv_zeros"]["diff_mean"]) == pytest.approx(statistics.mean(diffs), abs=1e-7)
    if diffs[0] != diffs[1]:
        t = stats.ttest_rel([values[("refconv_zeros", s)] for s in (0, 1)], [values[("control", s)] for s in (0, 1)])
        assert float(table["refconv_zeros"]["paired_t_p"]) == pytest.approx(t.pvalue, abs=1e-6)
    assert table["control"]["role"] == "reference" and table["control"]["diff_mean"] == ""
    for name in ("study_metric.png", "study_curves.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entries = sorted(p.name for p in (root / "hparams").iterdir())
    assert entries == ["control_seed_0", "control_seed_1", "refconv_zeros_seed_0", "refconv_zeros_seed_1"]
    events = EventAccumulator(str(root / "hparams" / "control_seed_0"))
    events.Reload()
    assert events.PluginTagToContent("hparams") and "test/top1" in events.Tags()["scalars"]

    # A second invocation runs nothing; re-aggregating gives the same numbers.
    before = _hashes(root)
    main(["study", "-c", str(config)])
    second = capsys.readouterr().out
    assert second.count("finished, skipped") == 4 and ": fit" not in second
    assert _hashes(root) == before
    main(["study", "-c", str(config), "aggregate"])
    assert _hashes(root) == before

    # The study changed under finished runs: refused, naming the key, before anything runs or is written.
    changed = _write_study(tmp_path / "changed.yaml", root, data, checkpoint, zeros_init="default")
    for step in ([], ["aggregate"]):
        with pytest.raises(
            SystemExit, match=r"refvision study: error: .*model\.init_args\.conv\.init: 'zeros' -> 'default'"
        ):
            main(["study", "-c", str(changed), *step])
    assert _hashes(root) == before
