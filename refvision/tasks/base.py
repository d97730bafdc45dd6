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
from typing import Any, ClassVar, Literal, TypedDict

import torch
from lightning import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import Metric

from refvision.checkpoints.loading import load_init_from
from refvision.lifecycle.divergence import DivergenceGuard
from refvision.lifecycle.ema import WeightEMA
from refvision.lifecycle.graceful_stop import StopOnSignal
from refvision.lifecycle.run_checkpoint import AtomicCheckpoints, RunCheckpoint
from refvision.lifecycle.run_logging import run_logging_callbacks
from refvision.lifecycle.run_state import RandomStateCheckpoint
from refvision.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from refvision.nn import get_method
from refvision.outputs.figures import figure_to_rgb, save_figure
from refvision.outputs.tables import PerClassTable
from refvision.surgery.convert import convert, reparameterize
from refvision.surgery.trainable import TrainableMode, freeze_norm_statistics, set_trainable


class ConvConfig(TypedDict, total=False):
    """``model.conv``: which convs become what (see ``refvision.surgery.convert``).

    ``kind`` is ``none``, a registered method (``refconv``, ``drconv``, ``acconv``) or the class
    path of a user's :class:`~refvision.nn.ConvMethod`. ``options`` are that method's
    ``from_conv`` keywords; ``map_k``, ``map_groups``, ``init``, ``regions`` and ``residual`` are shorthands
    for the built-in methods' options.
    """

    kind: str
    select: Literal["depthwise", "kxk", "pointwise", "all"]
    include: list[str] | None
    exclude: list[str] | None
    options: dict[str, Any]
    map_k: int
    map_groups: int | None
    init: Literal["default", "zeros"]
    regions: int
    residual: bool


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
_OPTION_SHORTHANDS = ("map_k", "map_groups", "init", "regions", "residual")


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
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.9998),
            validated, checkpointed and deployed instead of the trained weights
            (:class:`~refvision.lifecycle.ema.WeightEMA`); null: off.
    """

    default_conv_include: ClassVar[list[str] | None] = None
    """Module-name patterns converted when ``conv.include`` is not given (e.g. the backbone)."""
    download_options: ClassVar[tuple[str, ...]] = ()
    """Init arguments that name weights to download; cleared in saved checkpoints."""
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"
    """The validation metric that picks ``best.ckpt`` (and so the deploy checkpoint)."""
    num_classes_note: ClassVar[str] = ""
    """How this task counts ``num_classes``, quoted in the class-count mismatch error."""
    num_classes: int

    def __init__(
        self,
        conv: ConvConfig | None = None,
        init_from: str | None = None,
        init_prefix: str | None = None,
        init_strict: bool = True,
        trainable: TrainableMode = "all",
        optim: OptimConfig | None = None,
        deploy: bool = False,
        class_names: list[str] | None = None,
        mean: tuple[float, float, float] | None = IMAGENET_MEAN,
        std: tuple[float, float, float] | None = IMAGENET_STD,
        ema_decay: float | None = None,  # training-only: the checkpoints hold the averaged weights
    ) -> None:
        super().__init__()
        self.conv_config: ConvConfig = {"kind": "none", **(conv or {})}
        self.optim_config: OptimConfig = {**OPTIM_DEFAULTS, **(optim or {})}
        self.trainable = trainable
        self._init = (init_from, init_prefix, init_strict)
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
        init_from, init_prefix, init_strict = self._init
        if init_from:
            load_init_from(model, init_from, prefix=init_prefix, strict=init_strict)
        kind = self.conv_config["kind"]
        if kind != "none":
            try:
                get_method(kind)
            except ValueError as err:
                raise ValueError(f"model.conv.kind: {err}; or none to keep the model as built") from None
            include = self.conv_config.get("include") or self.default_conv_include
            options = {k: self.conv_config[k] for k in _OPTION_SHORTHANDS if k in self.conv_config}
            options.update(self.conv_config.get("options") or {})
            convert(
                model,
                kind,
                select=self.conv_config.get("select", "kxk"),
                include=include,
                exclude=self.conv_config.get("exclude"),
                **options,
            )
        if self.deploy:
            model = reparameterize(model, inplace=True)
        set_trainable(model, self.trainable)
        self.model = model

    def train(self, mode: bool = True) -> "RefvisionTask":
        super().train(mode)
        if mode and self.trainable == "refocus_only":
            freeze_norm_statistics(self.model)
        return self

    def configure_callbacks(self) -> list[Callback]:
        """The reliability callbacks, ``best.ckpt`` by :attr:`monitor` + ``last.ckpt`` every validation, and
        with a logger the learning rate and the HParams (see ``refvision.lifecycle.run_logging``).

        A ``ModelCheckpoint`` configured by the user (``trainer.callbacks``) wins: it is kept as
        configured and :class:`~refvision.lifecycle.run_checkpoint.RunCheckpoint` is not added (logged).
        """
        callbacks: list[Callback] = [RandomStateCheckpoint(), DivergenceGuard(), StopOnSignal(), AtomicCheckpoints()]
        configured = [
            c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint) and not _is_lightning_default(c)
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
        else:
            callbacks.append(RunCheckpoint(monitor=self.monitor, mode=self.monitor_mode))
        callbacks += run_logging_callbacks(self.trainer, self.monitor)  # LR and HParams, where there is a logger
        if self.ema_decay is not None and self.trainer.state.fn == "fit":
            callbacks.append(WeightEMA(self.ema_decay))
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint carries its weights: rebuilding it must not re-load or download others.
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:
            for key in ("init_from", *self.download_options):
                if key in hparams:
                    hparams[key] = None
        checkpoint["refvision"] = {
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            "form": "deploy" if self.deploy else "train",
        }

    @classmethod
    def deploy_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters of the deploy form of a model trained with ``hparams``.

        A method that ``folds_to_conv`` (RefConv, ACConv) folds into the original architecture
        (``conv.kind: none``); any other (DRConv) keeps its conversion and is built in its
        inference form (``deploy: true``).
        """
        out = {**hparams, "init_from": None}
        for key in cls.download_options:
            if key in out:
                out[key] = None
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
        for stem, figure in self.evaluation_figures(result).items():
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
