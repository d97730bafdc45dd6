"""``refvision demo``: the refocus workflow per task on generated data, as a small study over seeds.

For each task, a study (:mod:`refvision.app.study`) in ``<root>/<task>/``: one baseline trained from
scratch (``baseline/seed_0/``, shared by the seeds), then per seed ``s`` from its ``best.ckpt`` two arms
for the same epochs, the
*control* (plain convs continued, ``control/seed_<s>/``) and RefConv refocusing (``refconv/seed_<s>/``,
whose fit also writes the re-parameterized ``best-deploy.ckpt``); every run is tested on the held-out
test split (``<run>/test/``). The table shows per arm the val before the first step next to the final
test metric over seeds, and RefConv - control paired by seed; the note under it says what these numbers
show. Every number comes from these runs.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from refvision.app.command_path import command_path_hint
from refvision.app.demo.data import ensure_demo_data
from refvision.app.demo.note import demo_note
from refvision.app.demo.results import (
    BASELINE,
    CONTROL,
    REFCONV,
    DemoRow,
    SeedRun,
    arm_stats,
    format_rows,
    save_results,
)
from refvision.app.lightning_cli import lightning_cli
from refvision.app.study.aggregate import RunResult, collect, summarize_study, write_summary
from refvision.app.study.config import Study, make_study, plan, settings
from refvision.app.study.runner import read_result, run_local
from refvision.checkpoints.deploy import load_task_checkpoint
from refvision.surgery.profile import profile

SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class DemoTask:
    """How the demo runs one task: its config (the baseline's recipe), its data folder, its test metric,
    the arms' epochs and how they continue: ``continue_lr`` the AdamW learning rate (no warm-up, a fresh
    optimizer state, BatchNorm statistics updated as in the baseline; RefConv with the config's init)."""

    config: str
    data: str
    metric: str
    label: str
    arm_epochs: int
    continue_lr: float


DEMO_TASKS: dict[str, DemoTask] = {
    "classification": DemoTask("demo/classification.yaml", "imagefolder", "test/top1", "top-1 %", 6, 0.0002),
    "detection": DemoTask("demo/detection.yaml", "voc", "test/map", "mAP@0.5 %", 4, 0.0003),
    "segmentation": DemoTask("demo/segmentation.yaml", "cityscapes", "test/miou", "mIoU %", 4, 0.0002),
}

EXPLANATION = (
    "Per task: one baseline trained from scratch (the first seed), then per seed s the control (plain convs) "
    "and RefConv (conv/refconv.yaml) continued from its best.ckpt with seed s; Δ vs baseline is against that "
    "one baseline. val at start: the baseline's best val (what its arms start from) / an arm's val before its "
    "first training step; lowest val after: an arm's lowest val after the switch; test: each run's best.ckpt "
    "on the held-out test split, mean ± std over seeds. Δ: paired by seed, mean and 95% Student-t interval; "
    "p-values two-sided: paired t-test (scipy.stats.ttest_rel) and Wilcoxon signed-rank (scipy.stats.wilcoxon; "
    "exact, with fewer than 6 seeds it cannot go below 0.05). max |Δ| train vs deploy: the largest output gap "
    "between RefConv's training form and its re-parameterized deploy form (same params and FLOPs as the baseline)."
)


def task_study(name: str, root: Path, data_root: Path, seeds: tuple[int, ...] = SEEDS) -> Study:
    """The study the demo runs for task ``name`` in ``root/name``: one baseline (the first seed's), then per seed
    the control and RefConv from it, continued at ``continue_lr`` without warm-up."""
    spec = DEMO_TASKS[name]
    continuation = {"model.optim.lr": spec.continue_lr, "model.optim.warmup_epochs": 0}
    return make_study(
        {
            "root": str(root / name),
            "metric": spec.metric,
            "seeds": list(seeds),
            "configs": [spec.config],
            "overrides": {"data.root": str(data_root)},
            "start": {"baseline": {}, "shared_baseline": True},
            "arms": {
                CONTROL: {
                    "configs": ["conv/control.yaml"],
                    "overrides": {**continuation, "trainer.max_epochs": spec.arm_epochs},
                },
                REFCONV: {
                    "configs": ["conv/refconv.yaml"],
                    "overrides": {**continuation, "trainer.max_epochs": spec.arm_epochs},
                },
            },
            "reference": CONTROL,
        }
    )


def seed_runs(study: Study, results: list[RunResult]) -> dict[str, list[SeedRun]]:
    """The finished runs by arm in percent: the baseline's start is its best val (the max of its val curve,
    which its best.ckpt holds); an arm's is its step-0 val, its lowest the lowest val after step 0."""
    out: dict[str, list[SeedRun]] = {}
    for r in results:
        later = [v for step, v in r.curve.items() if step > 0]
        if r.arm == BASELINE:
            start, lowest = max(later, default=math.nan), math.nan
        else:
            start, lowest = r.start, min(later, default=math.nan)
        out.setdefault(r.arm, []).append(SeedRun(r.seed, 100 * r.value, 100 * start, 100 * lowest))
    return out


def _model_name(task: Any) -> str:
    hparams = task.hparams
    variant = next((hparams[key] for key in ("backbone", "detector", "encoder") if key in hparams), None)
    return f"{type(task.model).__name__} ({variant})" if variant else type(task.model).__name__


def _input_size(inputs: Any) -> str:
    """``"HxW"`` of the first image of a batch tensor ``(B, 3, H, W)`` or a list of ``(3, H, W)``."""
    return "x".join(str(n) for n in inputs[0].shape[-2:])


def _split_sizes(study: Study) -> tuple[int, int, int]:
    """``(train, val, test)`` images of the study's data, as its data module reads them."""
    run = plan(study)[0]
    args = [arg for path in run.configs for arg in ("-c", str(path))]
    cli = lightning_cli([*args, "--data.root", str(study.overrides["data.root"]), "--trainer.logger=false"], run=False)
    data = cli.datamodule
    data.setup("fit")
    data.setup("test")
    return len(data.train_set), len(data.val_set), len(data.test_set)


@contextlib.contextmanager
def stage_lines_only(log: Path) -> Iterator[TextIO]:
    """Yield the stream for the stage lines. On a terminal that is stdout and nothing changes (the progress
    is live). Otherwise (a log file, a pipe) what the fits and tests print, and Lightning's own messages
    (per-class tables, folders), go to ``log`` instead, so that each stage is one line on stdout."""
    if sys.stdout.isatty():
        yield sys.stdout
        return
    out = sys.stdout
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    handlers = [logger.handlers[:] for logger in loggers]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as file, contextlib.redirect_stdout(file):
        to_file = logging.StreamHandler(file)
        try:
            for logger in loggers:
                logger.handlers = [to_file]
            yield out
        finally:
            for logger, saved in zip(loggers, handlers, strict=True):
                logger.handlers = saved


def run_task(
    name: str, root: Path, data_root: Path, seeds: tuple[int, ...] = SEEDS, say: Callable[[str], None] = print
) -> DemoRow:
    """Run (or resume) task ``name``'s study and summarise it; its study files go to ``root/name``."""
    spec = DEMO_TASKS[name]
    start = time.perf_counter()
    study = task_study(name, root, data_root, seeds)
    run_local(study, [], jobs=1, say=lambda line: say(f"[{name}] {line.removeprefix('refvision study: ')}"))
    results = collect(study)
    write_summary(study, summarize_study(study, results), results)
    arms = arm_stats(seed_runs(study, results))
    finished = {(run.arm, run.seed): read_result(run)["best_checkpoint"] for run in plan(study)}
    first = seeds[0]
    deploys = [
        str(Path(finished[REFCONV, s]).with_name(Path(finished[REFCONV, s]).stem + "-deploy.ckpt")) for s in seeds
    ]
    max_abs_diff = max(
        float(torch.load(path, map_location="cpu", weights_only=True)["refvision"]["max_abs_diff"]) for path in deploys
    )
    base_task = load_task_checkpoint(finished[BASELINE, first])[0]
    deploy_task = load_task_checkpoint(deploys[0])[0]
    train_task = load_task_checkpoint(finished[REFCONV, first])[0]
    inputs = base_task.example_inputs()
    profiles = [profile(task.profile_module(), inputs=inputs) for task in (base_task, deploy_task, train_task)]
    init = train_task.hparams["conv"]["init"]
    return DemoRow(
        task=name,
        label=spec.label,
        arms=arms,
        params=tuple(p.params_total for p in profiles),
        flops=tuple(p.flops for p in profiles),
        max_abs_diff=max_abs_diff,
        seconds=time.perf_counter() - start,
        model=_model_name(base_task),
        data=f"{spec.data} {data_root}",
        input_size=_input_size(inputs),
        images=_split_sizes(study),
        epochs=(int(settings(plan(study)[0], None)["trainer.max_epochs"]), spec.arm_epochs),
        recipe=f"AdamW lr {spec.continue_lr:g}, no warm-up; RefConv init {init}",
    )


def run_demo(root: str | Path, tasks: list[str], seeds: tuple[int, ...] = SEEDS) -> list[DemoRow]:
    """Generate (or reuse) the demo data under ``root/data``, run ``tasks``, print and save the table and
    the note. A second call resumes: finished runs are skipped."""
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise ValueError(f"--tasks {unknown}: unknown; allowed: {', '.join(DEMO_TASKS)}")
    start = time.perf_counter()
    root = Path(root)
    data = ensure_demo_data(root / "data")
    rows = []
    for i, name in enumerate(tasks, 1):
        print(f"refvision demo: task {i}/{len(tasks)}: {name}, baseline then control and RefConv x {len(seeds)} seeds")
        with stage_lines_only(root / name / "output.log") as out:
            say = functools.partial(print, file=out, flush=True)
            rows.append(run_task(name, root, data[DEMO_TASKS[name].data], seeds, say))
        print(f"[{name}] done in {_duration(rows[-1].seconds)}", flush=True)
    note = demo_note(rows)
    markdown, table = save_results(rows, root, note, EXPLANATION)
    print(f"\nrefvision demo: {len(seeds)} seeds ({', '.join(map(str, seeds))}) per task\n")
    print(format_rows(rows))
    print(f"\n{EXPLANATION}\n\n{note}\n")
    print(f"saved: {markdown}  {table}; per task: {root}/<task>/study.md, study_curves.png, study_metric.png")
    print(f"runs: {root}/<task>/<arm>/seed_<s>/ (fit logs, checkpoints; the test in test/); data: {root / 'data'}")
    if not sys.stdout.isatty():
        print(f"what the fits and tests printed: {root}/<task>/output.log")
    print(command_path_hint())
    print(f"total time: {_duration(time.perf_counter() - start)}")
    return rows


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
