"""Deploy checkpoints: a trained task checkpoint in, its re-parameterized form out.

A deploy checkpoint is an ordinary Lightning checkpoint whose hyper-parameters build the deploy
form directly (RefConv: the original architecture, ``conv.kind: none``; DRConv: its inference
form), so ``refvision test --ckpt_path deploy.ckpt`` and ``Task.load_from_checkpoint`` work, and
its ``state_dict`` loads with ``strict=True`` into the vanilla model class.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any

import lightning
import torch

from refvision.checkpoints.loading import (
    CheckpointError,
    class_path,
    describe_checkpoint,
    is_url,
    read_checkpoint,
    refvision_stamp,
    resolve_source,
    state_differences,
    task_of,
)
from refvision.lifecycle.divergence import non_finite_tensors
from refvision.surgery.convert import reparameterize
from refvision.surgery.profile import ModelProfile, profile
from refvision.tasks.base import RefvisionTask
from refvision.utils.atomic_file import check_writable, save_atomically
from refvision.utils.class_path import import_class
from refvision.utils.listing import first_and_more
from refvision.utils.text_table import render_table

_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
_PRIVATE_KEYS = ("_class_path", "_instantiator")


@dataclasses.dataclass(frozen=True)
class DeployReport:
    """What :func:`reparameterize_checkpoint` did: the two forms' profiles and their output gap."""

    source: str
    output: str
    train: ModelProfile
    deploy: ModelProfile
    max_abs_diff: float

    def __str__(self) -> str:
        lines = [forms_table(self.train, self.deploy)]
        lines.append(f"max |output(train) - output(deploy)| = {self.max_abs_diff:.3e}")
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)


def forms_table(train: ModelProfile, deploy: ModelProfile, *more_rows: tuple[str, str, str]) -> str:
    """The parameter counts and FLOPs of a model's train and deploy forms side by side, then ``more_rows``
    (label, train value, deploy value)."""
    rows = [
        (label, *(f"{getattr(form, field):,}" for form in (train, deploy)))
        for label, field in (
            ("params total", "params_total"),
            ("params trainable", "params_trainable"),
            ("params training-only", "params_training_only"),
            ("FLOPs (mult-adds)", "flops"),
        )
    ]
    return render_table(("", "train form", "deploy form"), [*rows, *more_rows])


def load_task_checkpoint(path: str | os.PathLike) -> tuple[RefvisionTask, dict[str, Any]]:
    """Rebuild the task saved in local file ``path`` with its weights (read by :func:`read_checkpoint`).

    Returns ``(task, hparams)``; nothing is downloaded or loaded besides the checkpoint itself.

    Raises:
        CheckpointError: an unreadable or unsafe file, or one that is not a refvision task checkpoint,
            or whose contents do not rebuild its task (a task class this refvision does not have,
            hyper-parameters the task does not take or rejects, weights missing, unexpected or of
            another shape than the task's); the message names the file and the offending keys.
    """
    return task_from_checkpoint(read_checkpoint(resolve_source(path, "--ckpt"), "--ckpt"), path)


def task_from_checkpoint(
    checkpoint: Any, path: str | os.PathLike, option: str = "--ckpt"
) -> tuple[RefvisionTask, dict[str, Any]]:
    """:func:`load_task_checkpoint` on the contents of a checkpoint already read from ``path``.

    Errors name ``option`` and ``path``; they are those of :func:`load_task_checkpoint`.
    """
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"{option} {path}: not a Lightning checkpoint (no 'state_dict'); it holds {describe_checkpoint(checkpoint)}"
        )
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    task_path = task_of(checkpoint)
    if not task_path:
        raise CheckpointError(
            f"{option} {path}: the checkpoint does not say which refvision task wrote it; "
            f"it holds {describe_checkpoint(checkpoint)}"
        )
    try:
        task_cls = import_class(task_path)
    except (ImportError, AttributeError, ValueError):
        task_cls = None
    if not (isinstance(task_cls, type) and issubclass(task_cls, RefvisionTask)):
        raise CheckpointError(
            f"{option} {path}: written by task {task_path!r}, which this refvision does not "
            "have (a checkpoint of another refvision version?); expected a refvision task "
            "class"
        )
    hparams = task_cls.without_weight_sources({k: v for k, v in hparams.items() if k not in _PRIVATE_KEYS})
    accepted = task_cls.options()
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise CheckpointError(
            f"{option} {path}: ckpt['hyper_parameters'] holds {', '.join(map(repr, unknown))}, which "
            f"{task_cls.__name__} does not take (a checkpoint of another refvision version?); expected only "
            f"its arguments: {', '.join(sorted(accepted))}"
        )
    try:
        task = task_cls(**hparams)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{option} {path}: its hyper_parameters do not build {task_cls.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    try:
        task.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{option} {path}: {_weights_mismatch(task, checkpoint['state_dict'], err)}") from None
    return task.eval(), hparams


def load_task_to_write(
    source: str | os.PathLike, output: str | os.PathLike, overwrite: bool
) -> tuple[RefvisionTask, dict[str, Any]]:
    """Check that ``output`` may be written from checkpoint ``source`` (a path or a URL), then load the task from it.

    Raises (the path checks before the checkpoint is read, all before anything is written):
        ValueError: ``output`` is ``source`` (also through a link, even with ``overwrite``), or the
            checkpoint holds non-finite weights.
        IsADirectoryError / NotADirectoryError / PermissionError: ``output`` is a directory or ends in
            a path separator / a parent of it is a file / its folder is not writable (:func:`check_writable`).
        FileExistsError: ``output`` exists without ``overwrite``.
        CheckpointError: ``source`` does not rebuild its task (:func:`load_task_checkpoint`).
    """
    task, hparams, _ = _read_to_write(source, output, overwrite)
    return task, hparams


def _read_to_write(
    source: str | os.PathLike, output: str | os.PathLike, overwrite: bool
) -> tuple[RefvisionTask, dict[str, Any], dict[str, Any]]:
    """:func:`load_task_to_write`, also returning the checkpoint's data-module hyper-parameters."""
    if not is_url(source) and same_file(Path(source), Path(output)):
        raise ValueError(f"--output {output} is the input checkpoint --ckpt; choose another path")
    check_writable(output, f"--output {output}")
    if Path(output).exists() and not overwrite:
        raise FileExistsError(f"--output {output} exists; pass --overwrite to replace it")
    checkpoint = read_checkpoint(resolve_source(source, "--ckpt"), "--ckpt")
    task, hparams = task_from_checkpoint(checkpoint, source)
    bad = non_finite_tensors(task.state_dict())
    if bad:
        raise ValueError(f"{source} holds non-finite weights ({', '.join(bad[:5])}); nothing written")
    return task, hparams, dict(checkpoint.get("datamodule_hyper_parameters") or {})


def reparameterize_checkpoint(
    source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False, inputs: Any = None
) -> DeployReport:
    """Write the deploy form of checkpoint ``source`` to ``output``.

    ``source`` is never modified; an existing ``output`` is refused unless ``overwrite``; a
    directory, a path ending in a separator, or one in an unwritable folder always, before
    ``source`` is read (:func:`load_task_to_write`). The file is written atomically
    (``refvision.utils.atomic_file``), so a failure leaves neither a partial file nor a temporary
    one. A source with non-finite weights, or a non-finite output gap between the two forms, is
    refused. ``inputs`` (what the task's ``inputs_of`` gives; default ``task.example_inputs()``)
    are used to measure the largest output difference between the two forms.
    """
    task, hparams, data_hparams = _read_to_write(source, output, overwrite)
    source, output = str(source), Path(output)
    task_cls = type(task)
    deploy_hparams = task_cls.deploy_hparams(hparams)
    deploy_task = task_cls(**deploy_hparams).eval()
    deploy_task.model.load_state_dict(reparameterize(task.model).state_dict(), strict=True)
    inputs = task.example_inputs() if inputs is None else inputs
    with torch.no_grad():
        diff = (task.raw_forward(task.model, inputs) - deploy_task.raw_forward(deploy_task.model, inputs)).abs().max()
    if not torch.isfinite(diff):
        raise ValueError(
            f"{source}: max |output(train) - output(deploy)| is {float(diff)} (non-finite outputs); "
            "the deploy form cannot be verified, nothing written"
        )
    profile_input = task.example_inputs()
    report = DeployReport(
        source=str(source),
        output=str(output),
        train=_profile(task, profile_input),
        deploy=_profile(deploy_task, profile_input),
        max_abs_diff=float(diff),
    )
    checkpoint = {
        "state_dict": deploy_task.state_dict(),
        "hyper_parameters": {**deploy_hparams, "_class_path": class_path(task_cls), "_instantiator": _INSTANTIATOR},
        "pytorch-lightning_version": lightning.__version__,
        **({"datamodule_hyper_parameters": data_hparams} if data_hparams else {}),
        "refvision": refvision_stamp(task_cls, "deploy", source=str(source), max_abs_diff=report.max_abs_diff),
    }
    save_atomically(checkpoint, output)
    return report


def same_file(a: Path, b: Path) -> bool:
    """Whether paths ``a`` and ``b`` name one file (through symlinks and hard links too)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _profile(task: Any, inputs: Any) -> ModelProfile:
    return profile(task.profile_module(), inputs=inputs)


def _weights_mismatch(task: Any, state_dict: dict[str, Any], err: RuntimeError) -> str:
    """What keeps ``state_dict`` from loading into ``task``: its missing, unexpected and resized keys."""
    expected = task.state_dict()
    missing, unexpected, mismatched = state_differences(expected, state_dict)
    resized = [f"{k} (checkpoint {_shape(state_dict[k])}, expected {_shape(expected[k])})" for k in mismatched]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", resized)):
        if keys:
            parts.append(f"{len(keys)} key(s) {label}: {first_and_more(keys, 5)}")
    found = "; ".join(parts) or str(err).strip().splitlines()[0]
    return (
        f"its state_dict does not fit the {type(task).__name__} its hyper_parameters build ({found}); "
        "expected that network's weights (an edited checkpoint, or one of another refvision version?)"
    )


def _shape(value: Any) -> str:
    return "x".join(map(str, value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
