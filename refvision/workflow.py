"""``refvision demo``: the whole refocus workflow, per task, on generated data in the real formats.

For each task: train a baseline, then from its best checkpoint run (a) the control -- the
baseline continued with plain convs -- and (b) RefConv refocus learning, for the same number of
epochs; re-parameterize (b) (the deploy checkpoint is written by the fit itself); test the
baseline, the control and the deploy checkpoint; print one table. Every number printed comes
from these runs.
"""

import dataclasses
import time
from pathlib import Path

import torch

from refvision.cli import lightning_cli
from refvision.data.demo import ensure_demo_data
from refvision.deploy import load_task_checkpoint
from refvision.profile import profile

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass(frozen=True)
class DemoTask:
    """How the demo runs one task: its config, its data folder and its test metric."""

    config: str
    data: str
    metric: str
    label: str


DEMO_TASKS: dict[str, DemoTask] = {
    "classification": DemoTask("demo/classification.yaml", "imagefolder", "test/top1", "top-1 %"),
    "detection": DemoTask("demo/detection.yaml", "voc", "test/map", "mAP@0.5 %"),
    "segmentation": DemoTask("demo/segmentation.yaml", "cityscapes", "test/miou", "mIoU %"),
}


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One task's results."""

    task: str
    label: str
    baseline: float
    control: float
    refconv: float
    params: tuple[int, int]
    flops: tuple[int, int]
    max_abs_diff: float
    seconds: float


def _fit(config: Path, data_root: Path, run_dir: Path, extra: list[str]) -> str:
    cli = lightning_cli(["fit", "-c", str(config), *extra, "--data.root", str(data_root),
                         "--trainer.default_root_dir", str(run_dir)])
    best = cli.trainer.checkpoint_callback.best_model_path
    if not best:
        raise RuntimeError(f"{run_dir}: fit wrote no best checkpoint")
    return best


def _test(config: Path, data_root: Path, run_dir: Path, ckpt: str, metric: str) -> float:
    cli = lightning_cli(["test", "-c", str(config), "--data.root", str(data_root),
                         "--trainer.default_root_dir", str(run_dir), "--ckpt_path", ckpt])
    return 100 * float(cli.trainer.callback_metrics[metric])


def run_task(name: str, root: Path, data_root: Path) -> DemoRow:
    """Baseline -> control and RefConv -> deploy -> test, for demo task ``name``."""
    spec = DEMO_TASKS[name]
    start = time.perf_counter()
    config = CONFIG_DIR / spec.config
    run = root / name
    baseline = _fit(config, data_root, run / "baseline", [])
    init = ["--model.init_from", baseline]
    control = _fit(config, data_root, run / "control", ["-c", str(CONFIG_DIR / "conv/control.yaml"), *init])
    refconv = _fit(config, data_root, run / "refconv", ["-c", str(CONFIG_DIR / "conv/refconv.yaml"), *init])
    deploy = str(Path(refconv).with_name(Path(refconv).stem + "-deploy.ckpt"))
    scores = [_test(config, data_root, run / "test", ckpt, spec.metric) for ckpt in (baseline, control, deploy)]
    base_task, deploy_task = load_task_checkpoint(baseline)[0], load_task_checkpoint(deploy)[0]
    inputs = base_task.example_inputs()
    base_profile = profile(base_task.profile_module(), inputs=inputs)
    deploy_profile = profile(deploy_task.profile_module(), inputs=inputs)
    max_abs_diff = torch.load(deploy, map_location="cpu", weights_only=True)["refvision"]["max_abs_diff"]
    return DemoRow(
        task=name, label=spec.label, baseline=scores[0], control=scores[1], refconv=scores[2],
        params=(base_profile.params_total, deploy_profile.params_total),
        flops=(base_profile.flops, deploy_profile.flops),
        max_abs_diff=max_abs_diff, seconds=time.perf_counter() - start,
    )


def format_rows(rows: list[DemoRow]) -> str:
    """The demo's result table as aligned text."""
    header = ("task", "metric", "baseline", "control", "RefConv (deploy)", "params base / deploy",
              "FLOPs base / deploy", "max |Δ| train vs deploy", "time s")
    table = [header] + [
        (r.task, r.label, f"{r.baseline:.2f}", f"{r.control:.2f}", f"{r.refconv:.2f}",
         f"{r.params[0]:,} / {r.params[1]:,}", f"{r.flops[0]:,} / {r.flops[1]:,}",
         f"{r.max_abs_diff:.2e}", f"{r.seconds:.0f}")
        for r in rows
    ]
    width = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, width)) for row in table)


def run_demo(root: str | Path, tasks: list[str]) -> list[DemoRow]:
    """Generate (or reuse) the demo data under ``root/data``, run ``tasks``, print the table."""
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise ValueError(f"--tasks {unknown}: unknown; allowed: {', '.join(DEMO_TASKS)}")
    root = Path(root)
    data = ensure_demo_data(root / "data")
    rows = [run_task(name, root, data[DEMO_TASKS[name].data]) for name in tasks]
    print("\nrefvision demo: baseline, then control (baseline continued, plain convs) and RefConv refocusing "
          "for the same epochs from the baseline; RefConv tested in its re-parameterized deploy form.")
    print(format_rows(rows))
    print(f"data: {root / 'data'}  runs, logs and checkpoints: {root}")
    return rows
