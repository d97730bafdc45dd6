"""The Lightning half of the ``refvision`` command: ``fit / validate / test / predict``.

A :class:`~lightning.pytorch.cli.LightningCLI` whose model is any refvision task and whose data is
any LightningDataModule, both chosen by ``class_path`` in the (composable) ``-c`` configs.
"""

import importlib
import inspect
import os
import re
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from typing import Any

from lightning import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

import refvision.data  # noqa: F401  (registers the data modules for short class names)
import refvision.tasks.classification  # noqa: F401  (registers the tasks for short class names)
import refvision.tasks.detection  # noqa: F401
import refvision.tasks.segmentation  # noqa: F401
from refvision.engine.callbacks import DeployCheckpoint
from refvision.engine.checkpoint import check_task_checkpoint, safe_checkpoint_globals
from refvision.tasks.base import RefvisionTask

DESCRIBED_BY_DATA = ("num_classes", "class_names", "mean", "std", "palette", "ignore_index")
"""What a data module says about its data and the model takes from it (attributes of the data
module -> init arguments of the task, each where both exist)."""

EXTRA_COMMANDS_HELP = """\
workflow subcommands:
  reparameterize  --ckpt IN --output OUT [--overwrite]   write the deploy checkpoint of IN
  profile         -c CONFIG [-c ...] [--ckpt CKPT]      params / FLOPs / latency, train vs deploy form
  demo            [--root DIR]                           the whole refocus workflow on generated data
  export          --ckpt IN --output OUT --format FMT    ONNX / TorchScript / ExportedProgram of the deploy form
"""


class ConfigError(ValueError):
    """A command line or config that cannot be used; the message is the cause alone."""


def root_cause(err: BaseException) -> str:
    """The innermost explicit cause of ``err``, after the innermost config key named on the way,
    without jsonargparse's dump of the given values."""
    key = None
    while True:
        keys = re.findall(r'Parser key "([^"]+)"', str(err))
        key = keys[-1] if keys else key
        if err.__cause__ is None:
            break
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines()
             if not line.lstrip().startswith(("Given value", "Subtypes:", "- Expected a <class 'NoneType'>"))]
    cause = " ".join(line for line in lines if line)
    return f"{key}: {cause}" if key and not cause.startswith("Parser key") else cause


class RefvisionCLI(LightningCLI):
    """LightningCLI with the deploy-checkpoint callback always on, ``--ckpt_path`` read safely,
    TensorBoard + CSV loggers by default, and config errors raised as :class:`ConfigError`."""

    def init_parser(self, **kwargs: Any) -> Any:
        # Errors raise instead of printing usage with a dump of the whole namespace: the
        # command prints the cause alone (see refvision.app.cli.main).
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(root_cause(err)) from err

    def instantiate_classes(self) -> None:
        model_config = self._get(self.config, "model")
        given = given_description(model_config.class_path, model_config.init_args.as_dict())
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError) as err:
            raise ConfigError(root_cause(err)) from err
        check_description(given, self.datamodule, getattr(self.model, "num_classes_note", ""))

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(DeployCheckpoint, "deploy_checkpoint")
        # The input size is the data's: a data module that has `image_size` sets the model's
        # (classification crop, detector input side), so the two never disagree. Skipped where
        # the data module or the task has no such argument (Cityscapes, segmentation).
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size", apply_on="parse")
        # What the data is, from the instantiated data module (classes are only known once it has
        # read its folders). jsonargparse skips a link whose attribute the data module lacks (the
        # model keeps its value: for predict on plain images, the checkpoint's) or whose argument
        # the task lacks (palette: segmentation only). A model value the config or the checkpoint
        # gives is checked against the data's after instantiation (check_description).
        for key in DESCRIBED_BY_DATA:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", compute_fn=config_value,
                                  apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyper-parameters here and the Trainer loads it later (a URL
        # with weights_only=False). Download and check it first (readable, no pickle, this task's);
        # both then read the local file weights-only.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and str(ckpt_path) not in ("last", "best", "hpc", "registry"):
            model_class = self.config[subcommand].get("model.class_path")
            self.config[subcommand]["ckpt_path"] = str(check_task_checkpoint(ckpt_path, model_class)[0])
        with safe_checkpoint_globals():
            super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        config = self.config_init[subcommand]
        if config.get("weights_only") is False:
            raise ValueError("--weights_only false: refvision loads checkpoints with weights_only=True only")
        config["weights_only"] = True
        with safe_checkpoint_globals():
            super()._run_subcommand(subcommand)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        return super().instantiate_trainer(**kwargs)


def given_description(model_class: str, init_args: dict[str, Any]) -> dict[str, Any]:
    """The :data:`DESCRIBED_BY_DATA` values of a model config (its own, or merged from
    ``--ckpt_path``'s hyper-parameters) that differ from the task's defaults: the ones given."""
    module, _, name = model_class.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return {key: init_args[key] for key in DESCRIBED_BY_DATA
            if init_args.get(key) is not None and config_value(init_args[key]) != config_value(_default(cls, key))}


def check_description(given: dict[str, Any], datamodule: LightningDataModule, num_classes_note: str = "") -> None:
    """Refuse a given model value (:func:`given_description`) that the data module describes otherwise.

    The data module's value has been linked into the model; a different one in the config (or in
    the checkpoint being tested) means the model and the data disagree, so the run stops here,
    naming the key, instead of failing later on a shape or silently using the data's value.
    """
    for key, value in given.items():
        if not hasattr(datamodule, key):
            continue
        described = getattr(datamodule, key)
        if config_value(described) != config_value(value):
            note = num_classes_note if key == "num_classes" else ""
            raise ConfigError(
                f"model.{key}={config_value(value)}{note} but the data ({type(datamodule).__name__}) has {key}="
                f"{config_value(described)}{note}: the data module sets model.{key}; leave it out of the config "
                "(with --ckpt_path: the checkpoint was trained on other data)"
            )


def _default(cls: type, name: str) -> Any:
    """The default of init argument ``name`` of ``cls`` (looked up through the base classes), or None."""
    for klass in cls.__mro__:
        parameter = inspect.signature(klass.__init__).parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    return None


def config_value(value: Any) -> Any:
    """``value`` as a YAML config holds it (tuples as lists): how the links pass the data module's
    attributes, so that the model's hyper-parameters equal the data module's where both have a key
    (Lightning refuses to log hyper-parameters that differ, in type too)."""
    if isinstance(value, (list, tuple)):
        return [config_value(item) for item in value]
    return value


def default_loggers(root_dir: str) -> list[Logger]:
    """TensorBoard (first: it names the checkpoint folder) and CSV, both in ``root_dir/lightning_logs/version_<n>``.

    ``--trainer.logger`` left unset (or ``true``) means these; any other value is used as given.
    """
    board = TensorBoardLogger(root_dir, version=SLURMEnvironment.job_id())
    table = CSVLogger(root_dir, version=board.version)
    # Open the CSV log (rank 0) before TensorBoard writes into the shared folder, which the CSV
    # logger would otherwise take for a stale run and warn about.
    table.experiment  # noqa: B018
    return [board, table]


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> RefvisionCLI:
    """Run (or only build, ``run=False``) the Lightning part of the command on ``args``.

    ``args`` given, the process's own command line is not parsed (``refvision demo`` runs several
    such commands); LightningCLI's warning about having both is silenced. ``sys.argv`` itself is
    left alone: Lightning's DDP launcher starts the other ranks with it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return RefvisionCLI(
            RefvisionTask,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            parser_kwargs={"epilog": EXTRA_COMMANDS_HELP},
            save_config_kwargs={"overwrite": True},
        )
