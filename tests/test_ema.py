"""EMA of the weights (``model.ema_decay``): the average is an independent EMA of the weights after each
step, validated, checkpointed, folded into the deploy checkpoint, and resumed exactly after ``kill -9``."""

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fit_process import STEPS_PER_EPOCH, checkpoint_dir, finish, output_of, start_fit, wait_for

from refvision.app.demo.data import write_imagefolder
from refvision.checkpoints.deploy import reparameterize_checkpoint
from refvision.data.imagefolder import ImageFolderDataModule
from refvision.surgery.convert import reparameterize
from refvision.tasks.classification import ClassificationTask

DECAY = 0.5  # far from 1, so that a few steps separate the average from the weights


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=8, val_per_class=2, size=32)


class RecordWeights(L.Callback):
    """The module's float tensors after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        state = pl_module.state_dict()
        self.steps.append({k: v.detach().clone() for k, v in state.items() if v.is_floating_point()})


def _task(**options: object) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(
        backbone="resnet18", num_classes=4, image_size=32, conv={"kind": "refconv"}, optim={"lr": 0.05}, **options
    )


def test_validated_checkpointed_and_deployed_weights_are_the_ema(tmp_path: Path, data: Path) -> None:
    datamodule = ImageFolderDataModule(str(data), image_size=32, resize_size=32, batch_size=8, num_workers=0)
    task, recorder = _task(ema_decay=DECAY), RecordWeights()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=STEPS_PER_EPOCH,
        limit_val_batches=1,
        callbacks=[recorder],
        enable_progress_bar=False,
        logger=False,
    )
    trainer.fit(task, datamodule=datamodule)
    # The average, computed here: the first update copies the weights, then ema = d * ema + (1 - d) * w.
    expected = dict(recorder.steps[0])
    for step in recorder.steps[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * step[k] for k in expected}
    last_trained = recorder.steps[-1]
    assert max(float((expected[k] - last_trained[k]).abs().max()) for k in expected) > 1e-3

    best = torch.load(trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(best["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(best["current_model_state"][key], last_trained[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(task.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)  # after fit

    # Validation ran on the average: its loss is that of a model holding these weights.
    evaluated = _task()
    evaluated.load_state_dict(best["state_dict"])
    evaluated.eval()
    images, labels = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        loss = F.cross_entropy(evaluated(images), labels)
    torch.testing.assert_close(trainer.callback_metrics["val/loss"], loss, rtol=1e-5, atol=1e-6)

    # The deploy checkpoint is the average, folded.
    reparameterize_checkpoint(trainer.checkpoint_callback.best_model_path, tmp_path / "deploy.ckpt")
    deployed = torch.load(tmp_path / "deploy.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    folded = {f"model.{k}": v for k, v in reparameterize(evaluated.model).state_dict().items()}
    assert deployed.keys() == folded.keys()
    for key, value in folded.items():
        torch.testing.assert_close(deployed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_decay_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model.ema_decay=1.0: expected a value in \(0, 1\)"):
        _task(ema_decay=1.0)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


@pytest.mark.slow
def test_kill9_then_resume_continues_the_average_exactly(tmp_path: Path, data: Path) -> None:
    extra = ["--model.ema_decay", "0.8", "--trainer.max_epochs", "3"]
    reference = start_fit(tmp_path / "reference", data, *extra)
    killed = start_fit(tmp_path / "run", data, *extra)
    last = checkpoint_dir(tmp_path / "run") / "last.ckpt"
    wait_for(lambda: last.exists() or killed.poll() is not None, 600, "the first last.ckpt")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, output_of(killed)
    assert 0 < _load(last)["global_step"] < 3 * STEPS_PER_EPOCH

    finish(start_fit(tmp_path / "run", data, *extra, "--ckpt_path", str(last)))
    finish(reference)
    ref = _load(checkpoint_dir(tmp_path / "reference") / "last.ckpt")
    res = _load(checkpoint_dir(tmp_path / "run", version=1) / "last.ckpt")
    assert res["global_step"] == ref["global_step"] == 3 * STEPS_PER_EPOCH
    for part in ("state_dict", "current_model_state", "averaging_state"):
        assert _max_diff(ref[part], res[part]) <= 1e-6, part
    assert _max_diff(ref["state_dict"], ref["current_model_state"]) > 1e-4  # the average is not the weights
    ema_state = [k for k in ref["callbacks"] if k.startswith("WeightEMA")]
    assert ema_state and ref["callbacks"][ema_state[0]] == res["callbacks"][ema_state[0]]
