"""The part every refvision task shares: build -> ``init_from`` -> convert -> freeze, evaluation, the optimizer.

A task subclass builds its network in ``build_model`` and says how to run it raw
(``raw_forward``: one tensor of pre-post-processing outputs, used to compare train and deploy
forms). Everything about how a conv is implemented stays behind ``convert`` / ``reparameterize``.

Every task takes float RGB images in [0, 1] and normalises them itself with ``mean`` / ``std``
(:class:`~refvision.models.normalize.Normalize`, non-persistent buffers: checkpoint keys stay
those of the bare network), so the exported and profiled module (:meth:`profile_module`) takes
[0, 1] RGB too. What the data is -- ``num_classes``, ``class_names``, ``mean`` / ``std`` (and a
segmentation palette) -- is set from the data module by the command (see
``refvision.app.lightning_cli``) and saved in the hyper-parameters, so checkpoints carry it.

Evaluation is owned here: one metric per stage (``val``, ``test``) from ``create_metric``, fed
by ``evaluation_step``, computed, logged (``logged_metrics``) and reset at the end of each stage.
At ``test`` the per-class table is printed and saved as CSV and the task's figures are saved as
PNG, all in the trainer's ``log_dir`` (rank 0 writes), and the figures go to TensorBoard too.
"""

import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypedDict

import torch
from lightning import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import Metric

from refvision.checkpoints.loading import checkpoint_form, load_init_from, refvision_stamp
from refvision.data.description import IMAGENET_MEAN, IMAGENET_STD
from refvision.lifecycle.divergence import DivergenceGuard
from refvision.lifecycle.ema import WeightEMA
from refvision.lifecycle.graceful_stop import StopOnSignal
from refvision.lifecycle.run_checkpoint import AtomicCheckpoints, RunCheckpoint
from refvision.lifecycle.run_logging import run_logging_callbacks
from refvision.lifecycle.run_state import RandomStateCheckpoint
from refvision.lifecycle.start_validation import StartValidation
from refvision.models.normalize import Normalize
from refvision.nn import get_method
from refvision.outputs.figures import caption_figure, figure_to_rgb, run_caption, save_figure
from refvision.outputs.tables import PerClassTable
from refvision.surgery.convert import convert, reparameterize
from refvision.surgery.trainable import TrainableMode, freeze_norm_statistics, set_trainable
from refvision.tasks.conv_config import ConvConfig, conv_method
from refvision.tasks.options import Role, option_roles


class OptimConfig(TypedDict, total=False):
    """``model.optim``: optimizer and per-iteration learning-rate schedule."""

    name: Literal["sgd", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    warmup_epochs: float
    warmup_factor: float
    schedule: Literal["cosine", "poly", "constant"]
    poly_power: float
    min_lr_ratio: float
    norm_bias_weight_decay: float | None


OPTIM_DEFAULTS: OptimConfig = {
    "name": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 4e-5,
    "nesterov": False,
    "warmup_epochs": 0.0,
    "warmup_factor": 0.01,
    "schedule": "cosine",
    "poly_power": 0.9,
    "min_lr_ratio": 0.0,
    "norm_bias_weight_decay": None,
}


class InitialWeights(NamedTuple):
    """``model.init_from``, ``init_prefix`` and ``init_strict``: what :func:`load_init_from` loads at build."""

    source: str | None
    prefix: str | None
    strict: bool


class RefvisionTask(LightningModule):
    """Base class of the tasks; see the module docstring.

    Args:
        conv: which convs to replace; ``kind: none`` keeps the model as built.
        init_from: weights loaded before conversion: a local file (Lightning checkpoint, plain
            state dict), ``torchvision://<name>`` or a URL (see ``refvision.checkpoints.loading``).
        init_prefix: take only keys with this prefix from ``init_from`` (and strip it).
        init_strict: require ``init_from`` to cover the model exactly.
        trainable: ``all`` | ``all_but_basis`` | ``refocus_only`` (see ``refvision.surgery.trainable``).
        optim: optimizer and schedule; missing keys take :data:`OPTIM_DEFAULTS`.
        deploy: build the deploy form (DRConv's inference form); set by ``refvision reparameterize``.
        class_names: the names of the ``num_classes`` classes in label order (detection: background
            first), or null (classes named by number); the command sets it from the data module.
        mean: per-channel RGB mean the [0, 1] input is normalised with (the command sets it from
            the data module; default ImageNet's, which pretrained weights expect); null: the
            network takes the [0, 1] input as it is (detection: normalises with its own values).
        std: per-channel RGB standard deviation, as ``mean``.
        channels_last: run the network in channels-last memory order (its 4-D weights and the
            4-D image batches); cuDNN's fast kernels for convs, bf16 / fp16 above all, want it.
        compile: ``torch.compile`` the network (``nn.Module.compile``: checkpoint keys unchanged).
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.9998),
            validated, checkpointed and deployed instead of the trained weights
            (:class:`~refvision.lifecycle.ema.WeightEMA`); null: off.

    ``channels_last`` and ``compile`` change float rounding, not the function, and are off by default;
    they apply when a Trainer runs the task (:meth:`apply_speed_options`). cuDNN's autotuner for
    fixed input sizes is Lightning's ``--trainer.benchmark true``.

    Every init option, here and in each subclass, declares its :class:`~refvision.tasks.options.Role`
    in its annotation (``Annotated[<type>, Role.<role>]``); a subclass with an undeclared option is
    refused when it is defined. :meth:`options` lists them by role.
    """

    default_conv_include: ClassVar[list[str] | None] = None
    """Module-name patterns converted when ``conv.include`` is not given (e.g. the backbone)."""
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"
    """The validation metric that picks ``best.ckpt`` (and so the deploy checkpoint)."""
    num_classes_note: ClassVar[str] = ""
    """How this task counts ``num_classes``, quoted in the class-count mismatch error."""
    num_classes: int

    def __init__(
        self,
        conv: Annotated[ConvConfig | None, Role.ARCHITECTURE] = None,
        init_from: Annotated[str | None, Role.WEIGHTS] = None,
        init_prefix: Annotated[str | None, Role.TRAINING] = None,
        init_strict: Annotated[bool, Role.TRAINING] = True,
        trainable: Annotated[TrainableMode, Role.TRAINING] = "all",
        optim: Annotated[OptimConfig | None, Role.TRAINING] = None,
        deploy: Annotated[bool, Role.ARCHITECTURE] = False,
        class_names: Annotated[list[str] | None, Role.DATA] = None,
        mean: Annotated[tuple[float, float, float] | None, Role.DATA] = IMAGENET_MEAN,
        std: Annotated[tuple[float, float, float] | None, Role.DATA] = IMAGENET_STD,
        channels_last: Annotated[bool, Role.RUN] = False,
        compile: Annotated[bool, Role.RUN] = False,
        ema_decay: Annotated[float | None, Role.TRAINING] = None,
    ) -> None:
        super().__init__()
        self.conv_config: ConvConfig = {"kind": "none", **(conv or {})}
        self.optim_config: OptimConfig = {**OPTIM_DEFAULTS, **(optim or {})}
        self.trainable = trainable
        self.initial_weights = InitialWeights(init_from, init_prefix, init_strict)
        self.deploy = deploy
        self.class_names = list(class_names) if class_names is not None else None
        if (mean is None) != (std is None):
            raise ValueError(f"model.mean={mean}, model.std={std}: give both or neither")
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.normalize: nn.Module = Normalize(mean, std) if mean is not None and std is not None else nn.Identity()
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"model.ema_decay={ema_decay}: expected a value in (0, 1), e.g. 0.9998, or null (off)")
        self.ema_decay = ema_decay
        self.channels_last, self.compile_network = channels_last, compile
        self._compiled = False
        self.loaded_form: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        option_roles(cls)  # refuses an option without a declared role here, not in the middle of a command

    @classmethod
    def options(cls, *roles: Role) -> tuple[str, ...]:
        """The init options of this task that declare one of ``roles`` (none given: all), base class's first."""
        return tuple(name for name, role in option_roles(cls).items() if not roles or role in roles)

    @classmethod
    def without_weight_sources(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """``hparams`` with its :attr:`~refvision.tasks.options.Role.WEIGHTS` options set to None: the
        hyper-parameters of a checkpoint, whose own weights replace those it was built from."""
        return {**hparams, **{key: None for key in cls.options(Role.WEIGHTS) if key in hparams}}

    @classmethod
    def filled_option(cls, key: str, value: Any) -> Any:
        """``value`` of option ``key`` with what this task fills in, so that equal meanings compare equal:
        :data:`OPTIM_DEFAULTS` in a partial ``optim``; a ``conv`` of kind ``none`` is no conversion whatever
        else it says."""
        if key == "conv":
            conv = {"kind": "none", **(value or {})}
            return {"kind": "none"} if conv["kind"] == "none" else conv
        if key == "optim":
            return {**OPTIM_DEFAULTS, **(value or {})}
        return value

    @classmethod
    def value_note(cls, key: str) -> str:
        """What messages quote after a value of option ``key``: how this task counts ``num_classes``."""
        return cls.num_classes_note if key == "num_classes" else ""

    def build_model(self) -> nn.Module:
        """Build the network (pretrained weights by name allowed)."""
        raise NotImplementedError

    def raw_forward(self, model: nn.Module, inputs: Any) -> Tensor:
        """Run ``model`` (this task's network or its deploy form) on ``inputs`` ([0, 1] RGB, what
        :meth:`inputs_of` gives), normalised first, to one raw output tensor."""
        return model(self.normalize(inputs))

    def inputs_of(self, batch: Any) -> Any:
        """The model inputs within a batch of this task's data module."""
        return batch[0]

    def profile_module(self) -> nn.Module:
        """The module profiled and exported on :meth:`example_inputs`: [0, 1] RGB in, the raw
        outputs out, the normalisation included."""
        return nn.Sequential(self.normalize, self.model)

    def example_inputs(self) -> Any:
        """A small [0, 1] RGB input for profiling and train/deploy comparisons."""
        raise NotImplementedError

    def configure_model_pipeline(self) -> None:
        """Build, load ``init_from``, convert, (deploy,) freeze. Subclasses call it at the end of ``__init__``,
        ``num_classes`` set."""
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"model.class_names has {len(self.class_names)} names but model.num_classes="
                f"{self.num_classes}{self.num_classes_note}"
            )
        model = self.build_model()
        weights = self.initial_weights
        if weights.source:
            load_init_from(model, weights.source, prefix=weights.prefix, strict=weights.strict)
        if self.conv_config["kind"] != "none":
            method, options = conv_method(self.conv_config)
            include = self.conv_config.get("include") or self.default_conv_include
            convert(
                model,
                method,
                select=self.conv_config.get("select", "kxk"),
                include=include,
                exclude=self.conv_config.get("exclude"),
                **options,
            )
        if self.deploy:
            model = reparameterize(model, inplace=True)
        set_trainable(model, self.trainable)
        self.model = model

    def setup(self, stage: str) -> None:
        self.apply_speed_options()

    def apply_speed_options(self) -> None:
        """Apply ``channels_last`` and ``compile`` to the network; idempotent. Lightning calls it
        (:meth:`setup`) before every fit / validate / test / predict, so the modules that
        ``profile``, ``export`` and the deploy checkpoint build stay eager and contiguous."""
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile_network and not self._compiled:
            self.model.compile()
            self._compiled = True

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``channels_last``, the 4-D tensors of ``batch`` (the images) in channels-last order."""
        if not self.channels_last:
            return batch
        return apply_to_collection(
            batch, Tensor, lambda t: t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t
        )

    def train(self, mode: bool = True) -> "RefvisionTask":
        super().train(mode)
        if mode and self.trainable == "refocus_only":
            freeze_norm_statistics(self.model)
        return self

    def configure_callbacks(self) -> list[Callback]:
        """The reliability callbacks, :class:`~refvision.lifecycle.start_validation.StartValidation` when
        ``init_from`` is given, ``best.ckpt`` by :attr:`monitor` + ``last.ckpt`` every validation, and
        with a logger the learning rate and the HParams (see ``refvision.lifecycle.run_logging``).

        A ``ModelCheckpoint`` configured by the user (``trainer.callbacks``) wins: it is kept as
        configured and :class:`~refvision.lifecycle.run_checkpoint.RunCheckpoint` is not added (logged).
        A ``RunCheckpoint`` already among the trainer's callbacks is used as it is (the command gives
        the Trainer one, so that Lightning makes no default ``ModelCheckpoint`` for this one to replace).
        """
        callbacks: list[Callback] = [RandomStateCheckpoint(), DivergenceGuard(), StopOnSignal(), AtomicCheckpoints()]
        if self.initial_weights.source:  # trained weights: validate at step 0, so the switch shows (val_start/*)
            callbacks.append(StartValidation())
        configured = [
            c
            for c in self.trainer.callbacks
            if isinstance(c, ModelCheckpoint) and not isinstance(c, RunCheckpoint) and not _is_lightning_default(c)
        ]
        if configured:
            rank_zero_info(
                "checkpoints: using the configured "
                + ", ".join(
                    f"{type(c).__name__}(monitor={c.monitor!r}, filename={c.filename!r}, save_last={c.save_last!r})"
                    for c in configured
                )
                + f"; refvision's best.ckpt (by {self.monitor}) and last.ckpt at every "
                "validation are not added"
            )
        elif not any(isinstance(c, RunCheckpoint) for c in self.trainer.callbacks):
            callbacks.append(RunCheckpoint(monitor=self.monitor, mode=self.monitor_mode))
        callbacks += run_logging_callbacks(self.trainer, self.monitor)  # LR and HParams, where there is a logger
        if self.ema_decay is not None and self.trainer.state.fn == "fit":
            callbacks.append(WeightEMA(self.ema_decay))
        return callbacks

    def model_description(self) -> str:
        """The network's class, the architecture options that name it and the conv method, e.g.
        ``SSD (ssdlite320_mobilenet_v3_large, conv refconv)``: what figure titles call the model."""
        named = [
            str(self.hparams[key]) for key in self.options(Role.ARCHITECTURE) if isinstance(self.hparams.get(key), str)
        ]
        if self.conv_config["kind"] != "none":
            named.append(f"conv {self.conv_config['kind']}")
        return f"{type(self.model).__name__} ({', '.join(named)})" if named else type(self.model).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_form = checkpoint_form(checkpoint)  # train / deploy, for the test figures' titles

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint carries its weights: rebuilding it must not re-load or download others.
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            hparams.update(self.without_weight_sources(hparams))
        checkpoint["refvision"] = refvision_stamp(type(self), "deploy" if self.deploy else "train")

    @classmethod
    def deploy_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters of the deploy form of a model trained with ``hparams``.

        A method that ``folds_to_conv`` (RefConv, ACConv) folds into the original architecture
        (``conv.kind: none``); any other (DRConv) keeps its conversion and is built in its
        inference form (``deploy: true``).
        """
        out = cls.without_weight_sources(hparams)
        kind = (out.get("conv") or {}).get("kind", "none")
        if kind != "none":
            if get_method(kind).folds_to_conv:
                out["conv"] = {"kind": "none"}
            else:
                out["deploy"] = True
            out["trainable"] = "all"
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_config
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model.trainable={self.trainable!r} leaves no parameter to train")
        groups: list[dict[str, Any]] = [{"params": [p for _, p in params]}]
        if cfg["norm_bias_weight_decay"] is not None:
            flat = [p for n, p in params if p.ndim <= 1]
            groups = [
                {"params": [p for _, p in params if p.ndim > 1]},
                {"params": flat, "weight_decay": cfg["norm_bias_weight_decay"]},
            ]
        if cfg["name"] == "sgd":
            optimizer = torch.optim.SGD(
                groups,
                lr=cfg["lr"],
                momentum=cfg["momentum"],
                weight_decay=cfg["weight_decay"],
                nesterov=cfg["nesterov"],
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = (
            max(1, int(self.trainer.num_training_batches) // self.trainer.accumulate_grad_batches)
            if math.isfinite(self.trainer.num_training_batches)
            else total
        )
        warmup = min(total - 1, int(cfg["warmup_epochs"] * per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=_schedule(cfg, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- evaluation -------------------------------------------------------------------------

    logged_metrics: ClassVar[dict[str, tuple[str, ...]]] = {"val": (), "test": ()}
    """Keys of the metric's ``compute()`` result logged as ``<stage>/<key>``, per stage."""

    def create_metric(self) -> Metric:
        """A fresh metric for one evaluation stage; ``compute()`` returns a dict of tensors."""
        raise NotImplementedError

    def configure_metrics(self) -> None:
        """Create the ``val`` and ``test`` metrics (``eval_metrics``). Subclasses call it in ``__init__``."""
        self.eval_metrics = nn.ModuleDict({stage: self.create_metric() for stage in ("val", "test")})

    def evaluation_step(self, batch: Any, stage: str) -> tuple[Any, Any]:
        """Run the model on an evaluation batch: ``(preds, targets)`` for the metric's ``update``.

        May log per-batch values such as a loss under ``<stage>/``.
        """
        raise NotImplementedError

    def eval_class_names(self) -> list[str]:
        """Names of the classes, in label order: ``class_names``, else the label ids."""
        return list(self.class_names) if self.class_names is not None else [str(i) for i in range(self.num_classes)]

    def per_class_table(self, result: dict[str, Any]) -> PerClassTable | None:
        """The per-class table of a ``test`` result (printed and saved as CSV), or None."""
        return None

    def evaluation_figures(self, result: dict[str, Any]) -> dict[str, Figure]:
        """Figures of a ``test`` result by file stem (saved as ``<stem>.png``)."""
        return {}

    def evaluation_tables(self, result: dict[str, Any]) -> dict[str, PerClassTable]:
        """Further tables of a ``test`` result by file stem, saved as ``<stem>.csv`` (not printed)."""
        return {}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.eval_metrics["val"].update(*self.evaluation_step(batch, "val"))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.eval_metrics["test"].update(*self.evaluation_step(batch, "test"))

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def _end_evaluation(self, stage: str) -> None:
        metric = self.eval_metrics[stage]
        result = metric.compute()  # synchronised across processes
        metric.reset()
        for key in self.logged_metrics[stage]:
            name = f"{stage}/{key}"
            self.log(name, result[key].float(), prog_bar=name == self.monitor)
        if stage == "test":
            self._report(result)

    def _report(self, result: dict[str, Any]) -> None:
        """Print the per-class table; save it (CSV) and the figures (PNG, and to TensorBoard) on rank 0."""
        log_dir = Path(self.trainer.log_dir)  # a broadcast: every rank takes part
        if not self.trainer.is_global_zero:
            return
        table = self.per_class_table(result)
        tables = self.evaluation_tables(result)
        if table is not None:
            path = table.save_csv(log_dir / "test_per_class.csv")
            rank_zero_info(f"{table.title} (saved to {path}):\n{table.render()}")
        for stem, extra in tables.items():
            extra.save_csv(log_dir / f"{stem}.csv")
        boards = [logger.experiment for logger in self.trainer.loggers if isinstance(logger, TensorBoardLogger)]
        weights = self.trainer.ckpt_path or self.initial_weights.source
        caption = run_caption(self.model_description(), weights, self.loaded_form)
        for stem, figure in self.evaluation_figures(result).items():
            caption_figure(figure, caption)
            save_figure(figure, log_dir / f"{stem}.png")
            if boards:
                image = figure_to_rgb(figure)
                for board in boards:
                    board.add_image(stem.replace("test_", "test/", 1), image, self.global_step, dataformats="HWC")
        rank_zero_info(f"test tables and figures: {log_dir}")


def _is_lightning_default(callback: ModelCheckpoint) -> bool:
    """Whether ``callback`` is the ``ModelCheckpoint()`` that ``Trainer(enable_checkpointing=True)`` adds."""
    default = ModelCheckpoint()
    fields = (
        "monitor",
        "dirpath",
        "filename",
        "save_last",
        "save_top_k",
        "save_weights_only",
        "state_key",
        "save_on_exception",
    )
    return type(callback) is ModelCheckpoint and all(getattr(callback, f) == getattr(default, f) for f in fields)


def _schedule(cfg: OptimConfig, warmup: int, total: int):
    """LR factor per optimizer step: linear warm-up from ``warmup_factor``, then cosine / poly / constant."""

    def factor(step: int) -> float:
        if step < warmup:
            alpha = step / warmup
            return cfg["warmup_factor"] * (1 - alpha) + alpha
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg["schedule"] == "cosine":
            return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t))
        if cfg["schedule"] == "poly":
            return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * (1 - t) ** cfg["poly_power"]
        return 1.0

    return factor
