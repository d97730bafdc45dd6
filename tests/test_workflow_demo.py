"""``refvision demo``'s table: what it saves holds the run's numbers and their provenance."""

import csv
from pathlib import Path

import pytest
import yaml

from refvision.app.cli import lightning_cli
from refvision.app.demo import run as workflow
from refvision.app.demo.data import write_imagefolder

REPO = Path(__file__).resolve().parents[1]


def _tiny_classification_config(path: Path) -> Path:
    """The demo classification config at 32x32, one epoch, a few steps."""
    config = yaml.safe_load((REPO / "configs" / "demo" / "classification.yaml").read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=2, enable_progress_bar=False)
    config["model"]["init_args"].update(backbone="mobilenet_v2", image_size=32)
    config["data"]["init_args"].update(image_size=32, resize_size=32, batch_size=8, pin_memory=False)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_saved_table_holds_the_runs_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _tiny_classification_config(tmp_path / "tiny.yaml")
    data = write_imagefolder(tmp_path / "images", train_per_class=4, val_per_class=2, test_per_class=3, size=32)
    monkeypatch.setitem(
        workflow.DEMO_TASKS,
        "classification",
        workflow.DemoTask(str(config), "imagefolder", "test/top1", "top-1 %", refocus_epochs=1),
    )
    row = workflow.run_task("classification", tmp_path / "runs", data)
    markdown, table = workflow.save_results([row], tmp_path / "runs")

    (record,) = list(csv.DictReader(table.open()))
    assert list(record) == list(workflow.RESULT_COLUMNS)
    # The saved scores are the test metrics of the checkpoints, evaluated here once more.
    checkpoints = {
        "baseline": tmp_path / "runs/classification/baseline/lightning_logs/version_0/checkpoints/best.ckpt",
        "control": tmp_path / "runs/classification/control/lightning_logs/version_0/checkpoints/best.ckpt",
        "refconv_deploy": tmp_path
        / "runs/classification/refconv/lightning_logs/version_0/checkpoints/best-deploy.ckpt",
    }
    for column, ckpt in checkpoints.items():
        cli = lightning_cli(
            [
                "test",
                "-c",
                str(config),
                "--data.root",
                str(data),
                "--ckpt_path",
                str(ckpt),
                "--trainer.default_root_dir",
                str(tmp_path / "check"),
            ]
        )
        assert float(record[column]) == pytest.approx(100 * float(cli.trainer.callback_metrics["test/top1"]), abs=1e-9)
    # Provenance: the split sizes on disk, the configured epochs and seed, the model that ran.
    sizes = [len(list((data / split).rglob("*.*"))) for split in ("train", "val", "test")]
    assert [int(record[k]) for k in ("train_images", "val_images", "test_images")] == sizes == [16, 8, 12]
    assert (record["baseline_epochs"], record["refocus_epochs"], record["seed"]) == ("1", "1", "0")
    assert record["model"] == "MobileNetV2 (mobilenet_v2)" and record["input_size"] == "32x32"
    # Deploy = baseline architecture; the RefConv training form carries its refocusing weights.
    assert record["params_baseline"] == record["params_deploy"] and record["flops_baseline"] == record["flops_deploy"]
    assert int(record["refconv_train_params"]) > int(record["params_deploy"])
    assert int(record["refconv_train_flops"]) > int(record["flops_deploy"])
    assert float(record["baseline_val_best"]) >= float(record["baseline_val_last"])
    # The markdown holds the same numbers as printed, and says what the demo does not show.
    text = markdown.read_text()
    assert workflow.format_rows([row], markdown=True) in text and workflow.SCOPE in text
    for column in ("baseline", "control", "refconv_deploy"):
        assert f"| {float(record[column]):.2f} |" in text
