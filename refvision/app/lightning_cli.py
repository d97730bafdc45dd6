"""The Lightning half of the ``refvision`` command: ``fit / validate / test / predict``.

A :class:`~lightning.pytorch.cli.LightningCLI` whose model is any refvision task and whose data is
any LightningDataModule, both chosen by ``class_path`` in the (composable) ``-c`` configs.
"""

import contextlib
import inspect
import logging
import os
import re
import sys
import textwrap
import warnings
from argparse import ArgumentError
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from jsonargparse import DefaultHelpFormatter
from lightning import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

import refvision.data  # noqa: F401  (registers the data modules for short class names)
import refvision.tasks.classification  # noqa: F401  (registers the tasks for short class names)
import refvision.tasks.detection  # noqa: F401
import refvision.tasks.segmentation  # noqa: F401
from refvision.checkpoints.loading import (
    CheckpointError,
    check_task_checkpoint,
    checkpoint_form,
    evaluating,
    safe_checkpoint_globals,
)
from refvision.lifecycle.deploy_callback import DeployCheckpoint
from refvision.lifecycle.divergence import non_finite_tensors
from refvision.lifecycle.run_checkpoint import RunCheckpoint, taken_checkpoint_folders
from refvision.lifecycle.run_folder import remove_if_nothing_of_value
from refvision.models.weights import WeightsUnavailableError
from refvision.nn.method import get_method
from refvision.tasks.base import RefvisionTask
from refvision.tasks.options import Role, option_roles
from refvision.utils.class_path import import_class

EVALUATING_COMMANDS = ("validate", "test", "predict")
"""The subcommands that train nothing: they need trained weights, and write into a fresh folder."""

EXTRA_COMMANDS_HELP = """\
workflow subcommands:
  reparameterize  --ckpt IN --output OUT [--overwrite]   write the deploy checkpoint of IN
  profile         -c CONFIG [-c ...] | --ckpt CKPT      params / FLOPs / latency, train vs deploy form
  demo            [--root DIR]                           the whole refocus workflow on generated data
  export          --ckpt IN --output OUT --format FMT    ONNX / TorchScript / ExportedProgram of the deploy form
  study           -c STUDY [--index N | --jobs N | --list | aggregate]   arms x seeds with paired statistics
"""


def roles_help() -> str:
    """The help's account of the model option roles (each option's own shows in ``--model.help TASK``)."""
    width = max(len(role.name) for role in Role)
    lines = [f"  {role.name:<{width}}  {role.meaning}" for role in Role]
    return "\n".join(["model options by role (Annotated[<type>, Role.<role>] in --model.help TASK):", *lines, ""])


def every_task() -> list[type[RefvisionTask]]:
    """:class:`RefvisionTask` and every subclass of it defined so far (refvision's and a user's)."""
    found: list[type[RefvisionTask]] = [RefvisionTask]
    for task in found:
        found += [sub for sub in task.__subclasses__() if sub not in found]
    return found


def options_of_any_task(role: Role) -> list[str]:
    """The options that some task declares with ``role``, each once, in the order first declared."""
    return list(dict.fromkeys(key for task in every_task() for key in task.options(role)))


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the line breaks of descriptions and epilogs kept (the command and role
    tables); a line longer than the terminal is wrapped, its continuation under the table's second column."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            column = re.match(r"\s*\S+(?: \S+)*\s{2,}", line)
            hang = column.end() if column else len(line) - len(line.lstrip())
            lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent + " " * hang))
        return "\n".join(lines)


class ConfigError(ValueError):
    """A command line or config that cannot be used; the message is the cause alone."""


def root_cause(err: BaseException) -> str:
    """The innermost explicit cause of ``err``, after the innermost config key named on the way,
    without jsonargparse's dump of the given values.

    The chain is followed down to the first of refvision's own errors at most: their message is
    written for the user (``WeightsUnavailableError`` names the option and the local-file
    alternative), whereas what they wrap is the library's (``<urlopen error ...>``).
    """
    key = None
    while True:
        keys = re.findall(r'Parser key "([^"]+)"', str(err))
        key = keys[-1] if keys else key
        if err.__cause__ is None or type(err).__module__.partition(".")[0] == "refvision":
            break
        err = err.__cause__
    lines = [
        line.strip()
        for line in str(err).splitlines()
        if not line.lstrip().startswith(("Given value", "Subtypes:", "- Expected a <class 'NoneType'>"))
    ]
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
        self.mentioned_model_keys = mentioned_model_keys(sys.argv[1:] if args is None else args)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(root_cause(err)) from err

    def instantiate_classes(self) -> None:
        model_config = self._get(self.config, "model")
        task = import_class(model_config.class_path)
        given = given_data_options(task, model_config.init_args.as_dict())
        # test / validate / predict train nothing: init_from must then cover the whole model.
        scope = evaluating(self.subcommand) if self.subcommand in EVALUATING_COMMANDS else contextlib.nullcontext()
        try:
            with scope:
                super().instantiate_classes()
        except (ValueError, TypeError, OSError, WeightsUnavailableError) as err:
            raise ConfigError(root_cause(err)) from err
        refuse_data_contradictions(task, given, self.datamodule)

    def add_arguments_to_parser(self, parser: Any) -> None:
        ints_before_floats(parser)
        parser.add_lightning_class_args(DeployCheckpoint, "deploy_checkpoint")
        parser.add_argument(
            "--allow_random_basis",
            type=bool,
            default=False,
            help="fit: let a conv method that refocuses the model's own kernels (RefConv) start from a model "
            "without trained weights (no --model.init_from, no named weights)",
        )
        # The model class is only known once parsed: every option that some task declares is
        # linked. The data's init arguments (Role.DATA_ARGUMENT: the input size, e.g. the
        # classification crop, the detector input side) at parse, so that the two never disagree;
        # skipped where the data module or the task has no such argument.
        for key in options_of_any_task(Role.DATA_ARGUMENT):
            parser.link_arguments(f"data.init_args.{key}", f"model.init_args.{key}", apply_on="parse")
        # What the data is (Role.DATA), from the instantiated data module (classes are only known
        # once it has read its folders). jsonargparse skips a link whose attribute the data module
        # lacks (the model keeps its value: for predict on plain images, the checkpoint's) or whose
        # argument the task lacks (palette: segmentation only). A model value the config or the
        # checkpoint gives is checked against the data's after instantiation
        # (refuse_data_contradictions).
        for key in options_of_any_task(Role.DATA):
            parser.link_arguments(
                f"data.{key}", f"model.init_args.{key}", compute_fn=config_value, apply_on="instantiate"
            )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyper-parameters here and the Trainer loads it later (a URL
        # with weights_only=False). Download and check it first (readable, no pickle, this task's,
        # usable by the subcommand, not contradicting the model options given); both then read the
        # local file weights-only.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        model_class, init_args = config.get("model.class_path"), config.get("model.init_args").as_dict()
        if subcommand in EVALUATING_COMMANDS:
            check_weights_given(subcommand, ckpt_path, model_class, init_args)
        elif not ckpt_path and not config.get("allow_random_basis"):
            check_basis_trained(model_class, init_args)
        if ckpt_path and str(ckpt_path) not in ("last", "best", "hpc", "registry"):
            try:
                path, checkpoint = check_task_checkpoint(ckpt_path, model_class)
            except CheckpointError:
                raise
            except (OSError, ValueError, WeightsUnavailableError) as err:
                raise ConfigError(root_cause(err)) from err
            if subcommand == "fit":
                check_resumable(str(ckpt_path), checkpoint)
                check_epochs_left(str(ckpt_path), checkpoint, config.get("trainer.max_epochs"))
            else:
                check_finite(str(ckpt_path), checkpoint)
            check_model_options(
                model_class, init_args, str(ckpt_path), checkpoint, subcommand, self.mentioned_model_keys
            )
            config["ckpt_path"] = str(path)
        with safe_checkpoint_globals():
            super()._parse_ckpt_path()
        if ckpt_path and subcommand in EVALUATING_COMMANDS:
            merged = self.config[subcommand]["model"]["init_args"]
            for key in import_class(model_class).options(Role.RUN):
                if key in init_args and key in merged:
                    merged[key] = init_args[key]

    def before_fit(self) -> None:
        """Refuse a fit whose checkpoint folder holds another run's ``last.ckpt``, before anything is written
        (the config is saved when the fit starts)."""
        if not self.trainer.is_global_zero:
            return
        taken = taken_checkpoint_folders(self.trainer, self.config_init["fit"].get("ckpt_path"))
        if taken:
            raise ConfigError(
                f"checkpoint folder {taken[0]} holds another run's last.ckpt, which this fit would overwrite; "
                f"resume that run with --ckpt_path {os.path.join(taken[0], 'last.ckpt')}, or give this one a new "
                "--trainer.default_root_dir"
            )

    def _run_subcommand(self, subcommand: str) -> None:
        config = self.config_init[subcommand]
        if config.get("weights_only") is False:
            raise ValueError("--weights_only false: refvision loads checkpoints with weights_only=True only")
        config["weights_only"] = True
        with self._removed_if_failed(), safe_checkpoint_globals():
            super()._run_subcommand(subcommand)

    @contextlib.contextmanager
    def _removed_if_failed(self) -> Iterator[None]:
        """Remove the log folder this command created (:meth:`instantiate_trainer`) if the block fails before
        anything of value is in it (:func:`remove_if_nothing_of_value`)."""
        try:
            yield
        except BaseException:
            for folder in getattr(self, "created_folders", ()):
                remove_if_nothing_of_value(folder)
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        checkpointing = config.get("enable_checkpointing") is not False and not config.get("barebones")
        if checkpointing and "callbacks" not in kwargs and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            # The task's best.ckpt / last.ckpt callback, given to the Trainer: without one it would add a
            # default ModelCheckpoint, which the task's configure_callbacks then replaces (and Lightning says so).
            kwargs["callbacks"] = [*callbacks, RunCheckpoint(monitor=self.model.monitor, mode=self.model.monitor_mode)]
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            # The folders the loggers are about to create (the next free version) and that a failed run removes.
            run_folder = Path(TensorBoardLogger(root, version=SLURMEnvironment.job_id()).log_dir)
            self.created_folders = [f for f in (run_folder, run_folder.parent) if not f.exists()]
            kwargs["logger"] = default_loggers(root)
        elif config.get("logger") is False and self.subcommand in EVALUATING_COMMANDS:
            # Without a logger the run's folder is default_root_dir itself: the config and test tables
            # would overwrite those of an earlier run (a fit's config.yaml too). A fresh folder instead.
            kwargs["default_root_dir"] = fresh_folder(root, self.subcommand)
        with self._removed_if_failed():
            return super().instantiate_trainer(**kwargs)


def ints_before_floats(parser: Any) -> None:
    """Make every ``int``-or-``float`` option of ``parser`` try ``int`` first, as its signature declares.

    jsonargparse tries a union's members in order. Python caches ``typing.Union`` by its members as a
    set, so the Trainer's ``Optional[Union[int, float]]`` can come back as another library's
    ``Union[float, int, None]`` (``lightning.fabric`` declares one): ``--trainer.limit_val_batches 1``
    (one batch) then parsed as ``1.0`` (100 % of the batches). The union is rebuilt in the declared
    order, outside the cache.
    """
    for action in parser._actions:
        typehint = getattr(action, "_typehint", None)
        if get_origin(typehint) is not Union:
            continue
        members = get_args(typehint)
        if int in members and float in members and members.index(float) < members.index(int):
            ordered = tuple(sorted(members, key=lambda member: member is not int))
            action._typehint = type(typehint)(Union, ordered, name=getattr(typehint, "_name", None))


def check_weights_given(subcommand: str, ckpt_path: str | None, model_class: str, init_args: dict[str, Any]) -> None:
    """Refuse ``--ckpt_path best`` / ``last`` outside ``fit``, and warn when ``subcommand`` would
    evaluate a model without any trained weights (no ``--ckpt_path``, ``init_from`` or named weights).

    ``best`` and ``last`` name checkpoints of a fit run by the same Trainer; a new command has none,
    so Lightning would fail on ``best`` and evaluate the model as built on ``last``.
    """
    if ckpt_path in ("best", "last"):
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: refvision {subcommand} runs no fit, so there is no {ckpt_path} checkpoint "
            f"to take; pass the checkpoint file, e.g. <run folder>/checkpoints/{ckpt_path}.ckpt"
        )
    if ckpt_path:
        return
    options = import_class(model_class).options(Role.WEIGHTS)
    if any(init_args.get(key) for key in options):
        return
    warnings.warn(
        f"refvision {subcommand}: no weights given (--ckpt_path, {', '.join('--model.' + key for key in options)}); "
        "the model is evaluated as built, with random weights",
        UserWarning,
        stacklevel=2,
    )


def check_basis_trained(model_class: str, init_args: dict[str, Any]) -> None:
    """Refuse a fit that converts to a method refocusing the model's own kernels
    (:attr:`~refvision.nn.method.ConvMethod.needs_trained_weights`, RefConv) when the model gets no trained
    weights (no ``init_from``, no named weights): its frozen basis would be random kernels."""
    kind = (init_args.get("conv") or {}).get("kind", "none")
    try:
        if kind == "none" or not get_method(kind).needs_trained_weights:
            return
    except ValueError:  # an unknown kind: building the model names it
        return
    options = [key for key, role in option_roles(import_class(model_class)).items() if role is Role.WEIGHTS]
    if any(init_args.get(key) for key in options):
        return
    raise ConfigError(
        f"model.conv.kind={kind} refocuses the model's own kernels as a frozen basis, but no trained weights are "
        f"given ({', '.join('--model.' + key for key in options)} all unset), so the basis would be random; pass "
        "the baseline with --model.init_from <baseline best.ckpt> (or named weights), or --allow_random_basis true "
        "to train on a random basis on purpose"
    )


def check_finite(ckpt_path: str, checkpoint: dict) -> None:
    """Refuse to evaluate a checkpoint whose weights hold NaN or infinity (naming the tensors): the metrics
    and predictions would be NaN, or worse, look plausible."""
    bad = non_finite_tensors(checkpoint["state_dict"])
    if bad:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} holds non-finite weights (NaN or inf) in {listed}; nothing evaluated; "
            "use an earlier checkpoint of the run"
        )


def check_epochs_left(ckpt_path: str, checkpoint: dict, max_epochs: int | None) -> None:
    """Refuse to resume a fit whose checkpoint is from an epoch past ``max_epochs``, as Lightning does (its
    completed-epoch counter above ``max_epochs``), but before the new run's folder and its copy of the best
    checkpoint are made."""
    loops = checkpoint.get("loops") or {}
    done = loops.get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("completed")
    if max_epochs is None or max_epochs == -1 or not isinstance(done, int) or done <= max_epochs:
        return
    raise ConfigError(
        f"--ckpt_path {ckpt_path} was saved in epoch {done + 1} of its run, beyond --trainer.max_epochs "
        f"{max_epochs}; to train on, give --trainer.max_epochs {done + 1} or more; to start a new training "
        f"from its weights use --model.init_from {ckpt_path}"
    )


def check_resumable(ckpt_path: str, checkpoint: dict) -> None:
    """Refuse to resume a fit from a checkpoint that holds no training state (a deploy checkpoint:
    Lightning would fail on its missing optimizer state, after creating the run's folder)."""
    if checkpoint_form(checkpoint) == "deploy":
        what = "a deploy checkpoint (weights only)"
    elif not {"optimizer_states", "loops"} <= checkpoint.keys():
        what = "weights only (no optimizer or loop state)"
    else:
        return
    raise ConfigError(
        f"--ckpt_path {ckpt_path} is {what}; it cannot resume a fit; to start a new training "
        f"from its weights use --model.init_from {ckpt_path}"
    )


def check_model_options(
    model_class: str,
    init_args: dict[str, Any],
    ckpt_path: str,
    checkpoint: dict,
    subcommand: str,
    mentioned: Collection[str] = (),
) -> None:
    """Refuse a model option of the config that the ``--ckpt_path`` checkpoint would silently replace.

    LightningCLI builds the model from the checkpoint's hyper-parameters, over the config. A config
    value that differs from the checkpoint's was given if it differs from the task's default too, or
    if its key is in ``mentioned`` (:func:`mentioned_model_keys`): the run stops, naming the key and
    both values. A deploy checkpoint also takes the config of the training form it was made from
    (``conv.kind: refconv`` for a re-parameterized RefConv model). Not compared: the task's
    :attr:`Role.WEIGHTS <refvision.tasks.options.Role.WEIGHTS>` options (cleared in every checkpoint:
    its weights replace them) and ``Role.DATA_ARGUMENT`` ones (the data's, linked at parse), and
    outside ``fit`` its ``Role.RUN`` options (the config's are used) and ``Role.TRAINING`` ones.
    """
    cls = import_class(model_class)
    saved = checkpoint.get("hyper_parameters") or {}
    deployed = cls.deploy_hparams(init_args) if checkpoint_form(checkpoint) == "deploy" else {}
    skipped = {*cls.options(Role.WEIGHTS, Role.DATA_ARGUMENT)}
    if subcommand in EVALUATING_COMMANDS:
        skipped |= {*cls.options(Role.RUN, Role.TRAINING)}

    def comparable(key: str, value: Any) -> Any:
        return config_value(cls.filled_option(key, value))

    for key, value in init_args.items():
        if key in skipped or key.startswith("_") or key not in saved:
            continue
        given, theirs = comparable(key, value), comparable(key, saved[key])
        if given == theirs or (key not in mentioned and given == comparable(key, _default(cls, key))):
            continue
        if key in deployed and comparable(key, deployed[key]) == theirs:
            continue
        fix = (
            "to start a new training from these weights use --model.init_from"
            if subcommand == "fit"
            else f"leave model.{key} out, or pass the checkpoint of the model you mean"
        )
        raise ConfigError(
            f"model.{key}={config_value(value)} but the checkpoint --ckpt_path {ckpt_path} has "
            f"model.{key}={config_value(saved[key])}, which would replace it; {fix}"
        )


def mentioned_model_keys(args: Sequence[str]) -> set[str]:
    """The model init arguments that command line ``args`` names: as ``--model.<key>`` /
    ``--model.init_args.<key>``, or under ``model.init_args`` / ``model`` in a ``-c`` / ``--config``
    file (or inline YAML). A value equal to the task's default is given only if named here."""
    keys: set[str] = set()
    args = list(args)
    for i, arg in enumerate(args):
        option = arg.partition("=")[0]
        if option.startswith("--model."):
            keys.add(option.removeprefix("--model.").removeprefix("init_args.").partition(".")[0])
        elif option in ("-c", "--config"):
            text = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            model = yaml_mapping(text).get("model")
            if isinstance(model, dict):
                init_args = model.get("init_args")
                keys.update(init_args if isinstance(init_args, dict) else ())
                keys.update(key for key in model if key not in ("class_path", "init_args"))
    return keys


def yaml_mapping(text: str) -> dict:
    """The mapping in config file ``text`` (or in ``text`` itself, inline YAML); empty if it holds none."""
    try:
        content = yaml.safe_load(Path(text).read_text() if os.path.isfile(text) else text)
    except (OSError, yaml.YAMLError):
        return {}
    return content if isinstance(content, dict) else {}


def fresh_folder(root: str, name: str) -> str:
    """``root/<name>_<n>`` for the first ``n`` not taken (nothing is created)."""
    n = 0
    while os.path.exists(os.path.join(root, f"{name}_{n}")):
        n += 1
    return os.path.join(root, f"{name}_{n}")


def given_data_options(task: type[RefvisionTask], init_args: dict[str, Any]) -> dict[str, Any]:
    """The values of ``task``'s ``Role.DATA`` options in a model config (its own, or merged from
    ``--ckpt_path``'s hyper-parameters) that differ from the task's defaults: the ones given."""
    return {
        key: init_args[key]
        for key in task.options(Role.DATA)
        if init_args.get(key) is not None and config_value(init_args[key]) != config_value(_default(task, key))
    }


def refuse_data_contradictions(
    task: type[RefvisionTask], given: dict[str, Any], datamodule: LightningDataModule
) -> None:
    """Refuse a given value of a ``task`` option (:func:`given_data_options`) that the data module describes
    otherwise.

    The data module's value has been linked into the model; a different one in the config (or in
    the checkpoint being tested) means the model and the data disagree, so the run stops here,
    naming the key, instead of failing later on a shape or silently using the data's value.
    """
    # What each link took: a refvision data module's property reads its description (one it does not
    # state raises AttributeError, as the link saw); any other data module's attribute of that name.
    unstated = object()
    for key, value in given.items():
        described = getattr(datamodule, key, unstated)
        if described is unstated:
            continue
        if config_value(described) != config_value(value):
            note = task.value_note(key)
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
    if isinstance(value, dict):
        return {key: config_value(item) for key, item in value.items()}
    return value


def default_loggers(root_dir: str) -> list[Logger]:
    """TensorBoard (first: it names the checkpoint folder) and CSV, both in ``root_dir/lightning_logs/version_<n>``.

    ``--trainer.logger`` left unset (or ``true``) means these; any other value is used as given.
    """
    # No constant hp_metric: HParamsWithMetrics logs the run's real metrics with its hyper-parameters.
    board = TensorBoardLogger(root_dir, version=SLURMEnvironment.job_id(), default_hp_metric=False)
    table = CSVLogger(root_dir, version=board.version)
    # Open the CSV log (rank 0) before TensorBoard writes into the shared folder, which the CSV
    # logger would otherwise take for a stale run and warn about.
    table.experiment  # noqa: B018
    return [board, table]


LIBRARY_NOISE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # LightningCLI, when refvision passes the command line as ``args`` (lightning/pytorch/cli.py).
    ("LightningCLI's args parameter is intended", UserWarning, r"lightning\.pytorch\.cli"),
    # torch >= 2.10 deprecates ``LeafSpec``, which Lightning's pytree helper still builds for every
    # batch it moves (lightning/pytorch/utilities/_pytree.py); nothing to do for a user.
    (
        re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    ),
    # Lightning's data connector, because RefvisionTask.on_after_batch_transfer (channels_last) runs with
    # any data module: the task's hook is the one meant (lightning/pytorch/trainer/connectors/data_connector.py).
    (
        re.escape("You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a"),
        UserWarning,
        r"lightning\.pytorch\.trainer\.connectors\.data_connector",
    ),
)
"""``(message pattern, category, module pattern)`` of the library warnings a command leaves out (see
:func:`library_noise_filtered`); each pattern matches the start of that one message, from that module."""

LIBRARY_NOISE_LOGS: tuple[re.Pattern[str], ...] = (
    # Every Trainer logs an advertisement for the litlogger package
    # (lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py).
    re.compile(re.escape("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")),
)
"""Lightning's log messages (``lightning.pytorch.utilities.rank_zero``, its ``rank_zero_info``) a command
leaves out, matched from their start."""


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``patterns``."""

    def __init__(self, patterns: Sequence[re.Pattern[str]]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


@contextlib.contextmanager
def library_noise_filtered() -> Iterator[None]:
    """Within the block, leave out the library messages listed in :data:`LIBRARY_NOISE_WARNINGS` and
    :data:`LIBRARY_NOISE_LOGS`: each by its exact text and source, so every other warning still shows.

    The process's warning filters and Lightning's logger are as they were after the block.
    """
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    dropped = _DropMessages(LIBRARY_NOISE_LOGS)
    with warnings.catch_warnings():
        for message, category, module in LIBRARY_NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        rank_zero_log.addFilter(dropped)
        try:
            yield
        finally:
            rank_zero_log.removeFilter(dropped)


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> RefvisionCLI:
    """Run (or only build, ``run=False``) the Lightning part of the command on ``args``.

    ``args`` given, the process's own command line is not parsed (``refvision demo`` runs several
    such commands); LightningCLI's warning about having both is silenced. ``sys.argv`` itself is
    left alone: Lightning's DDP launcher starts the other ranks with it. The libraries' messages that
    say nothing about the run are left out while it runs (:func:`library_noise_filtered`).
    """
    with library_noise_filtered():
        return RefvisionCLI(
            RefvisionTask,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            parser_kwargs={
                "epilog": EXTRA_COMMANDS_HELP + "\n" + roles_help(),
                "formatter_class": HelpFormatter,
                **{
                    command: {"epilog": roles_help(), "formatter_class": HelpFormatter}
                    for command in ("fit", *EVALUATING_COMMANDS)
                },
            },
            save_config_kwargs={"overwrite": True},
        )
