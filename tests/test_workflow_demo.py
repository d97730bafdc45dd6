"""``refvision demo`` end to end on a tiny setting: the study layout, and a saved table and note that hold
the runs' own numbers."""

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from refvision.app.demo import run as workflow
from refvision.app.demo.data import write_imagefolder
from refvision.app.demo.note import demo_note
from refvision.app.demo.results import RESULT_COLUMNS

REPO = Path(__file__).resolve().parents[1]


def _tiny_classification_config(path: Path) -> Path:
    """The demo classification config with MobileNetV2, one epoch of two steps."""
    config = yaml.safe_load((REPO / "configs" / "demo" / "classification.yaml").read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=2, enable_progress_bar=False)
    config["model"]["init_args"].update(backbone="mobilenet_v2")
    config["data"]["init_args"].update(batch_size=8, pin_memory=False)
    path.write_text(yaml.safe_dump(config))
    return path


def _logged(folder: Path, key: str) -> list[float]:
    """Every value of ``key`` in the CSV logs under ``folder`` (one run's own logs)."""
    return [
        100 * float(row[key])
        for path in sorted(folder.glob("lightning_logs/version_*/metrics.csv"))
        for row in csv.DictReader(path.open())
        if row.get(key)
    ]


@pytest.mark.slow
def test_demo_runs_as_a_study_and_saves_its_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _tiny_classification_config(tmp_path / "tiny.yaml")
    data = write_imagefolder(tmp_path / "images", train_per_class=4, val_per_class=2, test_per_class=3, size=32)
    monkeypatch.setitem(
        workflow.DEMO_TASKS,
        "classification",
        workflow.DemoTask(str(config), "imagefolder", "test/top1", "top-1 %", arm_epochs=1, continue_lr=0.0002),
    )
    monkeypatch.setattr(workflow, "ensure_demo_data", lambda root: {"imagefolder": data})
    (row,) = workflow.run_demo(tmp_path / "runs", ["classification"], seeds=(0, 1))
    printed = capsys.readouterr().out
    note = demo_note([row])
    markdown, table = tmp_path / "runs/demo-results.md", tmp_path / "runs/demo-results.csv"

    # stdout is not a terminal here: one line per stage, what the runs printed in output.log.
    said = printed.splitlines()
    assert "per-class accuracy" not in printed and "Epoch 0" not in printed
    assert "per-class accuracy" in (tmp_path / "runs/classification/output.log").read_text()
    assert said[-1].startswith("total time: ") and note in printed
    task = tmp_path / "runs" / "classification"
    runs = {("baseline", 0): task / "baseline/seed_0"} | {
        (arm, s): task / arm / f"seed_{s}" for arm in ("control", "refconv") for s in (0, 1)
    }
    # One stage line per run start: the arm, seed, i of N and epochs; the test beside each fit, in test/.
    starts = [line for line in said if ": fit (" in line]
    assert starts[0].startswith("[classification] baseline/seed_0: fit (1/5), 1 epochs")
    assert [line.split(":")[0] for line in starts] == [f"[classification] {a}/seed_{s}" for a, s in runs]
    assert all(f"({i}/5)" in line for i, line in enumerate(starts, 1))
    for folder in runs.values():
        assert (folder / "test/lightning_logs/version_0/metrics.csv").is_file()
        assert _logged(folder, "test/top1") == []  # the fit's logs hold no test

    records = {r["arm"]: r for r in csv.DictReader(table.open())}
    assert list(next(iter(records.values()))) == list(RESULT_COLUMNS)
    tests = {key: _logged(folder / "test", "test/top1") for key, folder in runs.items()}
    baseline_best = max(_logged(runs["baseline", 0], "val/top1"))
    for arm in ("control", "refconv"):
        values = [tests[arm, s][0] for s in (0, 1)]
        assert [float(v) for v in records[arm]["test_per_seed"].split()] == pytest.approx(values, abs=1e-9)
        assert float(records[arm]["test_mean"]) == pytest.approx(np.mean(values), abs=1e-9)
        # Both conversions keep the baseline's function: the step-0 val is the baseline's best val.
        starts = [_logged(runs[arm, s], "val_start/top1") for s in (0, 1)]
        assert starts == [[pytest.approx(baseline_best, abs=1e-6)]] * 2
        assert float(records[arm]["vs_baseline_mean"]) == pytest.approx(np.mean(values) - tests["baseline", 0][0])
    diffs = [tests["refconv", s][0] - tests["control", s][0] for s in (0, 1)]
    assert float(records["refconv"]["vs_control_mean"]) == pytest.approx(np.mean(diffs), abs=1e-9)
    assert float(records["baseline"]["start_mean"]) == pytest.approx(baseline_best)
    # Provenance: the split sizes on disk, the epochs, the model; deploy = baseline architecture.
    sizes = [len(list((data / split).rglob("*.*"))) for split in ("train", "val", "test")]
    record = records["refconv"]
    assert [int(record[k]) for k in ("train_images", "val_images", "test_images")] == sizes == [16, 8, 12]
    assert (record["baseline_epochs"], record["arm_epochs"]) == ("1", "1")
    assert record["model"] == "MobileNetV2 (mobilenet_v2)" and record["input_size"] == "32x32"
    assert record["params"] == records["baseline"]["params"] and record["flops"] == records["baseline"]["flops"]
    assert float(record["max_abs_diff"]) < 1e-4
    text = markdown.read_text()
    assert note in text and f"{np.mean([tests['refconv', s][0] for s in (0, 1)]):.2f}" in text
    # The study's own summary of the same runs is beside them.
    assert (task / "study.md").is_file() and (task / "study_curves.png").is_file()
