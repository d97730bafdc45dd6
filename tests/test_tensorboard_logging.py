"""A fit's TensorBoard events hold the learning rate of every step and the run's hyper-parameters with the
metrics it reached (TensorBoard's HParams), read back with TensorBoard's own EventAccumulator."""

import math
from pathlib import Path

import pytest
from fit_process import STEPS_PER_EPOCH, fit_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from refvision.app.demo.data import write_imagefolder

EPOCHS, LR = 2, 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("run")
    data = write_imagefolder(root / "images", train_per_class=8, val_per_class=2, size=32)
    cli = fit_in_process(
        root / "fit",
        data,
        "--trainer.max_epochs",
        str(EPOCHS),
        "--trainer.log_every_n_steps",
        "1",
        "--model.optim",
        f"{{lr: {LR}, name: sgd}}",
    )
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", weights_only=True)
    return Path(cli.trainer.log_dir), cli


def _events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _hparams_sessions(events: EventAccumulator) -> list[dict[str, object]]:
    """Every ``session_start_info``'s hyper-parameters, in the order written."""
    content = events.PluginTagToContent("hparams")
    sessions = []
    for tag in content:
        data = HParamsPluginData.FromString(content[tag])
        if data.HasField("session_start_info"):
            hparams = data.session_start_info.hparams
            sessions.append({k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()})
    return sessions


def test_learning_rate_of_every_step_is_logged(run: tuple[Path, object]) -> None:
    log_dir, _ = run
    events = _events(log_dir)
    lr = {e.step: e.value for e in events.Scalars("lr-SGD")}
    total = EPOCHS * STEPS_PER_EPOCH
    assert sorted(lr) == list(range(total))
    for step, value in lr.items():  # the default schedule: cosine from LR to 0 over the run, no warm-up
        assert value == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * step / total)), rel=1e-6)


def test_hparams_hold_the_runs_options_and_real_metrics(run: tuple[Path, object]) -> None:
    log_dir, cli = run
    events = _events(log_dir)
    scalars = events.Tags()["scalars"]
    assert "hp_metric" not in scalars
    validation = [e.value for e in events.Scalars("val/top1")]
    assert events.Scalars("hp/best_val/top1")[-1].value == pytest.approx(max(validation))
    assert events.Scalars("hp/last_val/top1")[-1].value == pytest.approx(validation[-1])
    assert events.Scalars("hp/test/top1")[-1].value == pytest.approx(float(cli.trainer.callback_metrics["test/top1"]))
    sessions = _hparams_sessions(events)
    assert sessions, "no HParams written"
    assert sessions[-1]["backbone"] == "mobilenet_v2"
    assert sessions[-1]["optim/lr"] == pytest.approx(LR)
    assert sessions[-1]["num_classes"] == cli.datamodule.num_classes
    content = events.PluginTagToContent("hparams")
    metric_names = {
        m.name.tag
        for tag in content
        for m in HParamsPluginData.FromString(content[tag]).experiment.metric_infos
        if HParamsPluginData.FromString(content[tag]).HasField("experiment")
    }
    assert metric_names == {"hp/best_val/top1", "hp/last_val/top1"}  # the first set written: the fit's
