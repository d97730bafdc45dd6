"""A study's configuration: arms x seeds from a shared start, and how each run's command line is made.

A study config (YAML, composed with ``-c`` like the task configs) holds::

    root: runs/study/classification      # runs go to <root>/<arm>/seed_<s>/
    metric: test/top1                    # the number compared (a key the test stage logs)
    seeds: [0, 1, 2]
    configs: [demo/classification.yaml]  # every run's task config(s)
    overrides: {trainer.max_epochs: 4}   # every run's dotted overrides
    start:                               # one of:
      checkpoint: path/to/trained.ckpt   #   every arm starts from this file (--model.init_from)
      baseline: {overrides: {...}}       #   or a baseline trained once per seed in <root>/baseline/
      shared_baseline: false             # true: one baseline (the first seed's) for every seed's arms
    arms:
      control: {configs: [conv/control.yaml]}
      refconv_zeros: {configs: [conv/refconv.yaml], overrides: {model.conv.init: zeros}}
    reference: control

A config path is taken as given (relative to the working directory) if it exists there, else from
refvision's shipped configs (``conv/refconv.yaml``). The ``arms`` of a later ``-c`` replace an
earlier one's whole mapping.
"""

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from refvision.app.configs import config_root

BASELINE = "baseline"
"""The name of the start stage's folder, ``<root>/baseline/seed_<s>``; no arm may take it."""


class StudyError(ValueError):
    """A study that cannot run or be summarised as configured; the message names the file, key or run."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way of continuing from the start: task configs (composed after the study's) and dotted overrides."""

    configs: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Study:
    """A parsed study config; see the module docstring. ``baseline`` is None when ``checkpoint`` starts every arm."""

    root: Path
    metric: str
    seeds: tuple[int, ...]
    configs: tuple[str, ...]
    overrides: Mapping[str, Any]
    arms: Mapping[str, Arm]
    reference: str
    checkpoint: str | None
    baseline: Arm | None
    shared_baseline: bool = False

    @property
    def baseline_seeds(self) -> tuple[int, ...]:
        """The seeds the study trains a baseline for: every seed, or only the first with a shared baseline."""
        if self.baseline is None:
            return ()
        return self.seeds[:1] if self.shared_baseline else self.seeds

    def baseline_seed(self, seed: int) -> int:
        """The seed of the baseline the arms of ``seed`` start from."""
        return self.seeds[0] if self.shared_baseline else seed

    @property
    def stages(self) -> dict[str, Arm]:
        """The baseline (when trained by the study) then the arms, by folder name."""
        return {**({BASELINE: self.baseline} if self.baseline is not None else {}), **self.arms}

    @property
    def val_metric(self) -> str:
        """The validation counterpart of :attr:`metric` (``test/top1`` -> ``val/top1``)."""
        return "val/" + self.metric.partition("/")[2]

    @property
    def start_metric(self) -> str:
        """The step-0 metric a fit from trained weights logs (``val_start/top1``)."""
        return "val_start/" + self.metric.partition("/")[2]


@dataclasses.dataclass(frozen=True)
class Run:
    """One (stage, seed) of a study: its folder and its task configs and overrides, in order."""

    arm: str
    seed: int
    folder: Path
    configs: tuple[Path, ...]
    overrides: Mapping[str, Any]

    @property
    def name(self) -> str:
        return f"{self.arm}/seed_{self.seed}"


def resolve_config(path: str, key: str) -> Path:
    """``path`` as given if it exists, else under the shipped configs; raises naming ``key`` if neither."""
    for candidate in (Path(path), config_root() / path):
        if candidate.is_file():
            return candidate.resolve()
    raise StudyError(f"{key}: config {path} not found (as given, nor under {config_root()})")


def make_study(values: Mapping[str, Any]) -> Study:
    """A :class:`Study` from parsed ``values`` (the study command's arguments as a dict); checks it is usable."""
    arms = {
        name: Arm(tuple(arm.get("configs") or ()), dict(arm.get("overrides") or {}))
        for name, arm in values["arms"].items()
    }
    start = values.get("start") or {}
    checkpoint, baseline = start.get("checkpoint"), start.get("baseline")
    study = Study(
        root=Path(values["root"]),
        metric=values["metric"],
        seeds=tuple(values["seeds"]),
        configs=tuple(values.get("configs") or ()),
        overrides=dict(values.get("overrides") or {}),
        arms=arms,
        reference=values["reference"],
        checkpoint=checkpoint,
        baseline=None
        if baseline is None
        else Arm(tuple(baseline.get("configs") or ()), dict(baseline.get("overrides") or {})),
        shared_baseline=bool(start.get("shared_baseline")),
    )
    check_study(study)
    return study


def check_study(study: Study) -> None:
    """Raise :class:`StudyError` naming the first key of ``study`` that cannot be used."""
    if not study.arms:
        raise StudyError("arms: expected at least one arm")
    for name in study.arms:
        if name == BASELINE or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise StudyError(
                f"arms.{name}: expected a folder name of letters, digits, '_', '.', '-' other than {BASELINE!r}"
            )
    if study.reference not in study.arms:
        raise StudyError(f"reference: {study.reference!r} is not an arm; expected one of {', '.join(study.arms)}")
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise StudyError(f"seeds: {list(study.seeds)}: expected one or more distinct integers")
    if not re.fullmatch(r"test/\w+", study.metric):
        raise StudyError(f"metric: {study.metric!r}: expected a test metric, test/<name> (e.g. test/top1)")
    if (study.checkpoint is None) == (study.baseline is None):
        raise StudyError("start: expected exactly one of start.checkpoint and start.baseline")
    if study.shared_baseline and study.baseline is None:
        raise StudyError("start.shared_baseline: true needs start.baseline (a checkpoint is shared already)")
    if study.checkpoint is not None and not os.path.isfile(study.checkpoint):
        raise StudyError(f"start.checkpoint: {study.checkpoint} is not a file")
    for name, arm in study.stages.items():
        key = "start.baseline" if name == BASELINE else f"arms.{name}"
        for path in arm.configs:
            resolve_config(path, f"{key}.configs")
        for option in arm.overrides:
            _check_override(option, f"{key}.overrides")
    for path in study.configs:
        resolve_config(path, "configs")
    for option in study.overrides:
        _check_override(option, "overrides")


def _check_override(option: str, key: str) -> None:
    reserved = ("seed_everything", "ckpt_path", "trainer.default_root_dir", "model.init_from")
    if option in reserved or option == "model.init_args.init_from":
        raise StudyError(f"{key}.{option}: set by the study for every run; leave it out")


def plan(study: Study) -> list[Run]:
    """Every run of ``study`` in index order: the baseline's seeds (when trained by the study; only the first
    seed with a shared baseline), then each arm's."""
    return [
        Run(
            name,
            seed,
            study.root / name / f"seed_{seed}",
            tuple(resolve_config(p, "configs") for p in (*study.configs, *arm.configs)),
            {**study.overrides, **arm.overrides},
        )
        for name, arm in study.stages.items()
        for seed in (study.baseline_seeds if name == BASELINE else study.seeds)
    ]


def command_args(run: Run, init_from: str | None) -> list[str]:
    """The ``fit`` / ``test`` arguments every stage of ``run`` shares: configs, overrides, seed, folder, start."""
    args = [arg for path in run.configs for arg in ("-c", str(path))]
    args += [f"--{key}={_cli_value(value)}" for key, value in run.overrides.items()]
    args += ["--seed_everything", str(run.seed), "--trainer.default_root_dir", str(run.folder)]
    return args + (["--model.init_from", init_from] if init_from else [])


def _cli_value(value: Any) -> str:
    """``value`` as a command-line option value: strings as they are, anything else as inline YAML."""
    return (
        value
        if isinstance(value, str)
        else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    )


def settings(run: Run, init_from: str | None) -> dict[str, Any]:
    """What ``run`` is, as flat dotted keys: its configs merged in order, its overrides on top, the seed and
    the start. Compared with a run folder's saved copy to tell whether the study still describes that run."""
    merged: dict[str, Any] = {}
    for path in run.configs:
        content = yaml.safe_load(path.read_text()) or {}
        if not isinstance(content, dict):
            raise StudyError(f"{path}: expected a mapping of config keys")
        merged.update(_flat(content))
    merged.update(_flat({key: value for key, value in run.overrides.items()}))
    merged["seed_everything"] = run.seed
    merged["model.init_args.init_from"] = init_from
    return dict(sorted(merged.items()))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``model.conv.init`` is read as ``model.init_args.conv.init``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = _canonical(f"{prefix}{key}")
        if isinstance(value, Mapping):
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _canonical(key: str) -> str:
    head, _, rest = key.partition(".")
    if head in ("model", "data") and rest and rest.partition(".")[0] not in ("class_path", "init_args"):
        return f"{head}.init_args.{rest}"
    return key


def differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """``key: saved -> expected`` for every key whose value differs between two :func:`settings`."""
    return [
        f"{key}: {saved.get(key, '<unset>')!r} -> {expected.get(key, '<unset>')!r}"
        for key in sorted(saved.keys() | expected.keys())
        if saved.get(key, "<unset>") != expected.get(key, "<unset>")
    ]
