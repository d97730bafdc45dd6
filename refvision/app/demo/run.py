"""``refvision demo``: the whole refocus workflow, per task, on generated data in the real formats.

For each task: train a baseline (``best.ckpt`` chosen on the val split), then from it run (a) the
control -- the baseline continued with plain convs -- and (b) RefConv refocus learning, for the
same number of epochs; re-parameterize (b) (the deploy checkpoint is written by the fit itself);
test the baseline, the control and the deploy checkpoint on the held-out test split; print one
table and save it, with its provenance, as markdown and CSV. Every number comes from these runs.
"""

import csv
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from refvision.app.configs import config_root
from refvision.app.demo.data import ensure_demo_data
from refvision.app.lightning_cli import lightning_cli
from refvision.checkpoints.deploy import load_task_checkpoint
from refvision.surgery.profile import profile
from refvision.utils.text_table import render_table

CONFIG_DIR = config_root()

SCOPE = (
    "One seed, a few hundred images generated here, models trained from scratch on 2 CPU cores: "
    "the table shows that the workflow runs end to end and that the deploy form is exact. "
    "The differences between its columns are within the noise of such small test sets and are "
    "no evidence for or against RefConv; run the same commands on real data for that."
)


@dataclasses.dataclass(frozen=True)
class DemoTask:
    """How the demo runs one task: its config, its data folder, its test metric and the epochs of
    the control and RefConv runs (the baseline's come from the config)."""

    config: str
    data: str
    metric: str
    label: str
    refocus_epochs: int


DEMO_TASKS: dict[str, DemoTask] = {
    "classification": DemoTask("demo/classification.yaml", "imagefolder", "test/top1", "top-1 %", 10),
    "detection": DemoTask("demo/detection.yaml", "voc", "test/map", "mAP@0.5 %", 10),
    "segmentation": DemoTask("demo/segmentation.yaml", "cityscapes", "test/miou", "mIoU %", 6),
}


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One task's results and where they come from.

    ``scores`` are the test metric ``(baseline, control, RefConv deploy)`` in percent; ``params`` /
    ``flops`` are ``(baseline, deploy, RefConv train form)``, the train form with its training-only
    refocusing weights; ``images`` are the ``(train, val, test)`` split sizes; ``epochs`` are
    ``(baseline, control = RefConv)``; ``baseline_val`` is the baseline's validation metric
    ``(best, last epoch)``, in percent: far apart, the baseline had not settled.
    """

    task: str
    label: str
    scores: tuple[float, float, float]
    params: tuple[int, int, int]
    flops: tuple[int, int, int]
    max_abs_diff: float
    seconds: float
    model: str
    data: str
    input_size: str
    images: tuple[int, int, int]
    epochs: tuple[int, int]
    seed: int
    baseline_val: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class _Fit:
    best: str
    epochs: int
    seed: int
    train_size: int
    val_size: int
    val_best: float
    val_last: float


def _fit(config: Path, data_root: Path, run_dir: Path, extra: list[str]) -> _Fit:
    cli = lightning_cli(
        ["fit", "-c", str(config), *extra, "--data.root", str(data_root), "--trainer.default_root_dir", str(run_dir)]
    )
    best = cli.trainer.checkpoint_callback.best_model_path
    if not best:
        raise RuntimeError(f"{run_dir}: fit wrote no best checkpoint")
    data, trainer = cli.datamodule, cli.trainer
    return _Fit(
        best,
        trainer.current_epoch,
        int(cli.config.fit.seed_everything),
        len(data.train_set),
        len(data.val_set),
        100 * float(trainer.checkpoint_callback.best_model_score),
        100 * float(trainer.callback_metrics[cli.model.monitor]),
    )


def _test(config: Path, data_root: Path, run_dir: Path, ckpt: str, metric: str) -> tuple[float, int]:
    """``(100 * metric, test-set size)``."""
    cli = lightning_cli(
        [
            "test",
            "-c",
            str(config),
            "--data.root",
            str(data_root),
            "--trainer.default_root_dir",
            str(run_dir),
            "--ckpt_path",
            ckpt,
        ]
    )
    return 100 * float(cli.trainer.callback_metrics[metric]), len(cli.datamodule.test_set)


def _model_name(task: Any) -> str:
    hparams = task.hparams
    variant = next((hparams[key] for key in ("backbone", "detector", "encoder") if key in hparams), None)
    return f"{type(task.model).__name__} ({variant})" if variant else type(task.model).__name__


def _input_size(inputs: Any) -> str:
    """``"HxW"`` of the first image of a batch tensor ``(B, 3, H, W)`` or a list of ``(3, H, W)``."""
    return "x".join(str(n) for n in inputs[0].shape[-2:])


def run_task(name: str, root: Path, data_root: Path) -> DemoRow:
    """Baseline -> control and RefConv -> deploy -> test, for demo task ``name``."""
    spec = DEMO_TASKS[name]
    start = time.perf_counter()
    config = CONFIG_DIR / spec.config
    run = root / name
    baseline = _fit(config, data_root, run / "baseline", [])
    refocus = ["--model.init_from", baseline.best, "--trainer.max_epochs", str(spec.refocus_epochs)]
    control = _fit(config, data_root, run / "control", ["-c", str(CONFIG_DIR / "conv/control.yaml"), *refocus])
    refconv = _fit(config, data_root, run / "refconv", ["-c", str(CONFIG_DIR / "conv/refconv.yaml"), *refocus])
    deploy = str(Path(refconv.best).with_name(Path(refconv.best).stem + "-deploy.ckpt"))
    tested = [
        _test(config, data_root, run / "test", ckpt, spec.metric) for ckpt in (baseline.best, control.best, deploy)
    ]
    base_task, deploy_task = load_task_checkpoint(baseline.best)[0], load_task_checkpoint(deploy)[0]
    train_task = load_task_checkpoint(refconv.best)[0]
    inputs = base_task.example_inputs()
    profiles = [profile(task.profile_module(), inputs=inputs) for task in (base_task, deploy_task, train_task)]
    max_abs_diff = torch.load(deploy, map_location="cpu", weights_only=True)["refvision"]["max_abs_diff"]
    return DemoRow(
        task=name,
        label=spec.label,
        scores=(tested[0][0], tested[1][0], tested[2][0]),
        params=tuple(p.params_total for p in profiles),
        flops=tuple(p.flops for p in profiles),
        max_abs_diff=max_abs_diff,
        seconds=time.perf_counter() - start,
        model=_model_name(base_task),
        data=f"{spec.data} {data_root}",
        input_size=_input_size(inputs),
        images=(baseline.train_size, baseline.val_size, tested[0][1]),
        epochs=(baseline.epochs, refconv.epochs),
        seed=baseline.seed,
        baseline_val=(baseline.val_best, baseline.val_last),
    )


RESULT_COLUMNS = (
    "task",
    "metric",
    "baseline",
    "control",
    "refconv_deploy",
    "model",
    "data",
    "input_size",
    "train_images",
    "val_images",
    "test_images",
    "baseline_epochs",
    "refocus_epochs",
    "seed",
    "params_baseline",
    "params_deploy",
    "flops_baseline",
    "flops_deploy",
    "refconv_train_params",
    "refconv_train_flops",
    "baseline_val_best",
    "baseline_val_last",
    "max_abs_diff",
    "seconds",
)


def result_record(row: DemoRow) -> dict[str, Any]:
    """``row`` as one CSV record with :data:`RESULT_COLUMNS` (full precision, FLOPs as multiply-adds)."""
    (base_params, deploy_params, train_params), (base_flops, deploy_flops, train_flops) = row.params, row.flops
    values = (
        row.task,
        row.label,
        *row.scores,
        row.model,
        row.data,
        row.input_size,
        *row.images,
        *row.epochs,
        row.seed,
        base_params,
        deploy_params,
        base_flops,
        deploy_flops,
        train_params,
        train_flops,
        *row.baseline_val,
        row.max_abs_diff,
        round(row.seconds, 1),
    )
    return dict(zip(RESULT_COLUMNS, values))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = [header, tuple("---" for _ in header), *rows]
        return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)
    return render_table(header, rows)


def format_rows(rows: list[DemoRow], markdown: bool = False) -> str:
    """The demo's result table (aligned text, or markdown), then its provenance table."""
    results = [
        (
            r.task,
            r.label,
            *(f"{score:.2f}" for score in r.scores),
            f"{r.params[0]:,} / {r.params[1]:,}",
            f"{r.flops[0]:,} / {r.flops[1]:,}",
            f"{r.max_abs_diff:.2e}",
            f"{r.seconds:.0f}",
        )
        for r in rows
    ]
    provenance = [
        (
            r.task,
            r.model,
            r.input_size,
            " / ".join(str(n) for n in r.images),
            f"{r.epochs[0]} / {r.epochs[1]}",
            f"{r.baseline_val[0]:.2f} / {r.baseline_val[1]:.2f}",
            str(r.seed),
            f"{r.params[2]:,} / {r.flops[2]:,}",
            r.data,
        )
        for r in rows
    ]
    return "\n\n".join(
        (
            _table(
                (
                    "task",
                    "metric (test)",
                    "baseline",
                    "control",
                    "RefConv (deploy)",
                    "params base / deploy",
                    "FLOPs base / deploy",
                    "max |Δ| train vs deploy",
                    "time s",
                ),
                results,
                markdown,
            ),
            _table(
                (
                    "task",
                    "model",
                    "input",
                    "images train / val / test",
                    "epochs baseline / control = RefConv",
                    "baseline val best / last",
                    "seed",
                    "RefConv train form params / FLOPs",
                    "data",
                ),
                provenance,
                markdown,
            ),
        )
    )


def save_results(rows: list[DemoRow], root: Path) -> tuple[Path, Path]:
    """Write ``root/demo-results.md`` and ``root/demo-results.csv``; returns their paths."""
    markdown, table = root / "demo-results.md", root / "demo-results.csv"
    markdown.write_text(f"# refvision demo\n\n{format_rows(rows, markdown=True)}\n\n{SCOPE}\n")
    with table.open("w", newline="") as file:
        writer = csv.DictWriter(file, RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(result_record(row) for row in rows)
    return markdown, table


def run_demo(root: str | Path, tasks: list[str]) -> list[DemoRow]:
    """Generate (or reuse) the demo data under ``root/data``, run ``tasks``, print and save the table."""
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise ValueError(f"--tasks {unknown}: unknown; allowed: {', '.join(DEMO_TASKS)}")
    root = Path(root)
    data = ensure_demo_data(root / "data")
    rows = [run_task(name, root, data[DEMO_TASKS[name].data]) for name in tasks]
    markdown, table = save_results(rows, root)
    print(
        "\nrefvision demo: baseline (best checkpoint on val), then control (baseline continued, plain convs) "
        "and RefConv refocusing for the same epochs from the baseline; all tested on the held-out test split, "
        "RefConv in its re-parameterized deploy form."
    )
    print(format_rows(rows))
    print(f"\n{SCOPE}")
    print(f"saved: {markdown}  {table}")
    print(f"data: {root / 'data'}  runs, logs and checkpoints: {root}")
    return rows
