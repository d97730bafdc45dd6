"""Running a study's (stage, seed) runs: each an ordinary ``fit`` then ``test``, resumable, in-process or
spread over local processes (one per GPU, or ``--jobs`` on CPU).

A run's folder ``<root>/<arm>/seed_<s>/`` holds ``run.yaml`` (what the study asked for, written before
the fit), the fit's ``lightning_logs/version_<n>/``, ``config.yaml`` (LightningCLI's resolved fit config),
the test of its ``best.ckpt`` in ``test/`` beside them and, once tested, ``test_metrics.json``: a run with
that file is finished and skipped; one without resumes its fit from its newest ``last.ckpt``. A run
whose ``run.yaml`` no longer matches the study is refused, naming the keys.
"""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import refvision
from refvision.app.lightning_cli import lightning_cli
from refvision.app.study.config import BASELINE, Run, Study, StudyError, command_args, differences, plan, settings
from refvision.utils.atomic_file import open_atomically

RESULT_FILE = "test_metrics.json"
RUN_FILE = "run.yaml"


def read_result(run: Run) -> dict[str, Any] | None:
    """The ``test_metrics.json`` of ``run`` (``test``: its test metrics, ``best_checkpoint``...); None: unfinished."""
    path = run.folder / RESULT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def start_of(study: Study, run: Run) -> str | None:
    """The ``--model.init_from`` of ``run``: none for the baseline, else the study's checkpoint or the
    ``best.ckpt`` of the baseline of the same seed, or of the shared one (which must be finished)."""
    if run.arm == BASELINE:
        return None
    if study.checkpoint is not None:
        return str(Path(study.checkpoint).resolve())
    baseline = next(r for r in plan(study) if r.arm == BASELINE and r.seed == study.baseline_seed(run.seed))
    result = read_result(baseline)
    if result is None:
        index = plan(study).index(baseline)
        raise StudyError(
            f"{run.name} starts from {baseline.name}, which is not finished; run it first (--index {index}; "
            "in a job array, submit the baseline indices and make the arms depend on them)"
        )
    return result["best_checkpoint"]


def check_saved(study: Study, run: Run) -> None:
    """Refuse ``run`` if its folder was made for other settings than ``study`` gives it now, naming the keys."""
    path = run.folder / RUN_FILE
    if not path.is_file():
        return
    saved = (yaml.safe_load(path.read_text()) or {}).get("settings", {})
    changed = differences(saved, settings(run, start_of(study, run)))
    if changed:
        state = "finished" if read_result(run) else "started"
        raise StudyError(
            f"{path}: this {state} run was made with other settings than the study now gives it "
            f"({'; '.join(changed)}); "
            f"restore them, or move {run.folder} away to run it anew"
        )


def last_checkpoint(run: Run) -> Path | None:
    """The ``last.ckpt`` of ``run``'s newest fit that wrote one (the resume point), or None."""
    versions = sorted(
        (int(m.group(1)), p)
        for p in (run.folder / "lightning_logs").glob("version_*")
        if (m := re.fullmatch(r"version_(\d+)", p.name))
    )
    found = [p / "checkpoints" / "last.ckpt" for _, p in versions if (p / "checkpoints" / "last.ckpt").is_file()]
    return found[-1] if found else None


def quiet_args(subcommand: str) -> list[str]:
    """What keeps a ``fit`` / ``test`` to its own few lines when stdout is not a terminal (a log file, a pipe):
    no progress bar and, for ``test``, no results table; nothing on a terminal, where the progress is live."""
    if sys.stdout.isatty():
        return []
    return ["--trainer.enable_progress_bar=false", *(["--verbose=false"] if subcommand == "test" else [])]


def execute(
    study: Study, run: Run, say: Callable[[str], None] = print, position: tuple[int, int] | None = None
) -> bool:
    """Fit then test ``run`` in this process, resuming an interrupted fit; False if it was finished already.

    ``say`` gets one line as each stage starts (``position``, ``(i, n)``: the run is the i-th of n, counting
    from 1; the fit's epochs) and one when the run is done, with its metric and time."""
    check_saved(study, run)
    count = f" ({position[0]}/{position[1]})" if position else ""
    if read_result(run) is not None:
        say(f"refvision study: {run.name}: finished, skipped{count}")
        return False
    start = time.perf_counter()
    init_from = start_of(study, run)
    args = command_args(run, init_from)
    run.folder.mkdir(parents=True, exist_ok=True)
    wanted = settings(run, init_from)
    _write_text(
        run.folder / RUN_FILE,
        yaml.safe_dump({"arm": run.arm, "seed": run.seed, "fit": ["fit", *args], "settings": wanted}, sort_keys=False),
    )
    resume = last_checkpoint(run)
    epochs = wanted.get("trainer.max_epochs")
    say(
        f"refvision study: {run.name}: fit"
        + (f", resuming from {resume}" if resume else "")
        + f"{count}, {epochs if epochs is not None else 'default'} epochs"
        + (f", from {init_from}" if init_from else "")
    )
    fit = lightning_cli(["fit", *args, *quiet_args("fit"), *(["--ckpt_path", str(resume)] if resume else [])])
    if fit.trainer.interrupted:
        raise StudyError(f"{run.name}: the fit was interrupted; run the study again to resume it")
    best = fit.trainer.checkpoint_callback.best_model_path if fit.trainer.checkpoint_callback else ""
    if not best:
        raise StudyError(f"{run.name}: the fit wrote no best checkpoint in {run.folder}")
    saved_config = Path(fit.trainer.log_dir) / "config.yaml"
    if saved_config.is_file():
        shutil.copyfile(saved_config, run.folder / "config.yaml")
    say(f"refvision study: {run.name}: test {best}")
    test = lightning_cli(
        [
            "test",
            *command_args(run, None),
            *quiet_args("test"),
            "--trainer.default_root_dir",
            str(run.folder / "test"),
            "--ckpt_path",
            best,
        ]
    )
    metrics = {key: float(value) for key, value in test.trainer.callback_metrics.items() if key.startswith("test/")}
    if study.metric not in metrics:
        raise StudyError(
            f"metric: {study.metric} was not logged by the test of {run.name}; it logged {', '.join(sorted(metrics))}"
        )
    result = {
        "arm": run.arm,
        "seed": run.seed,
        "test": metrics,
        "best_checkpoint": best,
        "resumed_from": str(resume) if resume else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    _write_text(run.folder / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    say(f"refvision study: {run.name}: {study.metric} = {metrics[study.metric]:.6g} ({result['seconds']:.0f} s)")
    return True


def _write_text(path: Path, text: str) -> None:
    with open_atomically(path) as file:
        file.write(text.encode())


def run_index(study: Study, index: int) -> None:
    """Run the ``index``-th run of :func:`~refvision.app.study.config.plan` (a job array's task id)."""
    runs = plan(study)
    if not 0 <= index < len(runs):
        raise StudyError(f"--index {index}: this study has runs 0 to {len(runs) - 1}")
    execute(study, runs[index], position=(index + 1, len(runs)))


def local_devices() -> list[str]:
    """The CUDA device ids this process may use (as ``CUDA_VISIBLE_DEVICES`` names them); empty without GPUs."""
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def run_local(study: Study, argv: Sequence[str], jobs: int | None, say: Callable[[str], None] = print) -> None:
    """Run every unfinished run of ``study``: the baselines first, then the arms.

    One process at a time runs them here, in-process. With several GPUs (default: one run per GPU) or
    ``jobs > 1`` they run concurrently as ``python -m refvision study <argv> --index i`` subprocesses, each
    seeing one GPU (``CUDA_VISIBLE_DEVICES``) or, on CPU, its share of the cores (``OMP_NUM_THREADS``),
    its output in ``<run>/run.log``.
    """
    devices = local_devices()
    slots = jobs if jobs is not None else max(1, len(devices))
    if slots < 1:
        raise StudyError(f"--jobs {jobs}: expected a positive number of concurrent runs")
    runs = plan(study)
    waves = [[r for r in runs if r.arm == BASELINE], [r for r in runs if r.arm != BASELINE]]
    for wave in waves:
        for run in wave:  # refuse a mismatched run before starting any (the baselines are done by the arms' wave)
            check_saved(study, run)
        if slots == 1:
            for run in wave:
                execute(study, run, say, (runs.index(run) + 1, len(runs)))
            continue
        failed = _run_concurrently(study, [(runs.index(r), r) for r in wave], argv, slots, devices, say)
        if failed:
            raise StudyError(
                f"{len(failed)} run(s) failed: "
                + "; ".join(f"{run.name} (see {run.folder / 'run.log'})" for run in failed)
            )


def _run_concurrently(
    study: Study,
    indexed: list[tuple[int, Run]],
    argv: Sequence[str],
    slots: int,
    devices: list[str],
    say: Callable[[str], None],
) -> list[Run]:
    """Run ``indexed`` as subprocesses, ``slots`` at a time; returns the runs that failed."""
    free = list(range(slots))
    threads = str(max(1, (os.cpu_count() or 1) // slots))
    package_parent = str(Path(refvision.__file__).resolve().parents[1])

    def one(index: int, run: Run, slot: int) -> bool:
        if read_result(run) is not None:
            say(f"refvision study: {run.name}: finished, skipped")
            return True
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, (package_parent, os.environ.get("PYTHONPATH")))),
        }
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
        else:
            env.setdefault("OMP_NUM_THREADS", threads)
        run.folder.mkdir(parents=True, exist_ok=True)
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if devices else "CPU"
        say(f"refvision study: {run.name}: started ({where}; log {run.folder / 'run.log'})")
        command = [sys.executable, "-m", "refvision", "study", *argv, "--index", str(index), "--jobs", "1"]
        with (run.folder / "run.log").open("ab") as log:
            code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        say(f"refvision study: {run.name}: " + ("done" if code == 0 else f"failed (exit {code})"))
        return code == 0

    failed = []
    with concurrent.futures.ThreadPoolExecutor(slots) as pool:
        pending: dict[concurrent.futures.Future, tuple[Run, int]] = {}
        queue = list(indexed)
        while queue or pending:
            while queue and free:
                index, run = queue.pop(0)
                slot = free.pop(0)
                pending[pool.submit(one, index, run, slot)] = (run, slot)
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                run, slot = pending.pop(future)
                free.append(slot)
                if not future.result():
                    failed.append(run)
    return failed
