"""The GPU check (``make gpu-check``): the CUDA tests, then the benchmarks, all results in one folder.

Steps, each bounded in time so that the whole check ends in about 8 minutes on one H100:

1. the CUDA tests (every test parametrized by the ``device`` fixture, ``-k cuda``) -> ``tests.log``;
2. ``benchmarks/drconv_vs_dense.py --device cuda`` -> ``drconv_vs_dense.log``;
3. ``benchmarks/train_throughput.py --device cuda`` (training images/s and peak memory at the
   real sizes) -> ``throughput.md``, ``throughput.json``, ``throughput.log``;
4. ``refvision profile --device cuda`` of every model config with RefConv and with DRConv (the
   latency of the train and deploy forms, batch 1) -> ``profile.log``;

and ``gpu-check.md``: every table, beside MMDetection's and MMSegmentation's published numbers.
The folder is ``--out``, else ``$OUT``, else ``runs/gpu-check``. Without a CUDA device the check
stops at once with one line. ``--dry-run`` walks every step on CPU at tiny sizes (the tests step
then collects the CUDA tests, which skip), so that a slip in the script shows before a GPU runs it.

    python benchmarks/gpu_check.py [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(REPO))
# Importing refvision loads torch.utils.benchmark, whose import warns where the CUDA toolkit is found
# without a CUDA runtime (a CPU machine with nvcc): noise before the one-line refusal without CUDA.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from refvision.app.cli import main as refvision_main  # noqa: E402

CUDA_TEST_FILES = (
    "tests/test_refconv.py",
    "tests/test_drconv.py",
    "tests/test_precision.py",
    "tests/test_distributed.py",
)
TESTS_TIMEOUT_S = 210
DRCONV_TIMEOUT_S = 90
THROUGHPUT_BUDGET_S = 170
PROFILE_RUN_S = 0.5
DRY_RUN_PROFILE_S = 0.01
"""The dry run times each form for the fewest blocks (its latencies mean nothing)."""

PRECISIONS_NOTE = "cuDNN autotuner on; fp32 with PyTorch's defaults (cuDNN convs may use TF32); bf16 = autocast.\n"
DRY_RUN_NOTE = (
    "A dry run: every step on CPU at tiny sizes (batch 2, one step per measurement, 64x128 segmentation crops "
    "and profile inputs; the CUDA tests skip), to show that each step runs: its numbers say nothing about speed.\n"
)

PROFILED = (
    ("SSDLite320-MobileNetV3", "configs/detection/ssdlite320_mobilenet_v3_large_voc0712.yaml"),
    ("SSD300-VGG16", "configs/detection/ssd300_vgg16_voc0712.yaml"),
    ("DeepLabV3+ MobileNetV2", "configs/segmentation/deeplabv3plus_mobilenet_v2_cityscapes.yaml"),
    ("DeepLabV3+ ResNet-50", "configs/segmentation/deeplabv3plus_resnet50_cityscapes.yaml"),
)
CONVS = {"RefConv": ["configs/conv/refconv.yaml"], "DRConv": ["configs/conv/drconv.yaml"]}
SSD300_DRCONV_INCLUDE = ["backbone.*"]
"""SSD300-VGG16's ``backbone.features`` has no 1x1 conv: its DRConv form converts the whole backbone's
(as benchmarks/train_throughput.py)."""

PUBLISHED = """\
## Published numbers

Published numbers, measured on other hardware (their GPUs, not this one); beside them the closest
numbers of this run:

| what | this run | published (other hardware) |
|---|---|---|
| SSD300-VGG16 VOC training, s/iter | {ssd300} | MMDetection SSD300 VOC: 0.159 s/iter |
| DeepLabV3+ R-50 inference at 512x1024, fps | {deeplab} | MMSegmentation DeepLabV3+ R-50: 3.94 fps |
"""


class Profiled(NamedTuple):
    """What the check reads from one ``refvision profile`` table."""

    train_ms: float
    deploy_ms: float
    input_size: str
    """``HxW``"""


class Check:
    """The check's output folder and its log of steps."""

    def __init__(self, out: Path, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.started = time.perf_counter()
        self.steps: list[tuple[str, str, float]] = []
        self.failed: list[str] = []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def say(self, line: str) -> None:
        print(f"gpu-check [{time.perf_counter() - self.started:6.1f} s] {line}", flush=True)

    def run(self, name: str, argv: Sequence[str], log: str, timeout: float | None) -> int | None:
        """Run ``argv`` (Python arguments) in the repository, its output to ``log``; the exit code or
        None on timeout (``timeout`` None: no limit)."""
        self.say(f"{name}: {' '.join(argv)}")
        start = time.perf_counter()
        with (self.out / log).open("w") as out:
            try:
                code: int | None = subprocess.run(
                    [sys.executable, *argv],
                    cwd=REPO,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        took = time.perf_counter() - start
        status = f"timed out after {timeout:.0f} s" if code is None else f"exit {code}"
        self.steps.append((name, f"{status} (see {log})", took))
        if code != 0:
            self.failed.append(name)
        self.say(f"{name}: {status}, {took:.0f} s")
        return code


def device_description() -> str:
    if not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()}), dry run"
    props = torch.cuda.get_device_properties(0)
    return (
        f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"{torch.cuda.device_count()} device(s); CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    )


def run_tests(check: Check) -> str:
    """The CUDA tests; returns pytest's closing line."""
    code = check.run(
        "CUDA tests",
        ["-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-rs", "-k", "cuda", *CUDA_TEST_FILES],
        "tests.log",
        TESTS_TIMEOUT_S,
    )
    lines = (check.out / "tests.log").read_text().strip().splitlines()
    summary = lines[-1] if lines else "no output"
    if code is None:
        return f"timed out; last line: {summary}"
    return summary


def ssd300_drconv_scope() -> str:
    """A config that widens the DRConv form's ``model.conv`` to :data:`SSD300_DRCONV_INCLUDE`: the
    whole ``conv`` of configs/conv/drconv.yaml with ``include`` set (a config's ``conv`` replaces the
    one composed before it, so ``include`` alone would convert nothing)."""
    conv = yaml.safe_load((REPO / CONVS["DRConv"][-1]).read_text())["model"]["init_args"]["conv"]
    return yaml.safe_dump({"model": {"init_args": {"conv": {**conv, "include": SSD300_DRCONV_INCLUDE}}}})


def run_profiles(check: Check, device: str) -> tuple[str, dict[tuple[str, str], Profiled]]:
    """``refvision profile`` of every model with each conv method: the printed tables and, by (model,
    method), the latencies (ms) of the train and deploy forms and the input size."""
    profiled: dict[tuple[str, str], Profiled] = {}
    text = []
    run_time = DRY_RUN_PROFILE_S if check.dry_run else PROFILE_RUN_S
    with tempfile.TemporaryDirectory(prefix="refvision-gpu-check-") as tmp:
        scope = Path(tmp) / "ssd300_drconv_scope.yaml"
        scope.write_text(ssd300_drconv_scope())
        for model, config in PROFILED:
            for method, convs in CONVS.items():
                argv = ["profile", "-c", config, *[a for c in convs for a in ("-c", c)]]
                if model == "SSD300-VGG16" and method == "DRConv":
                    argv += ["-c", str(scope)]
                argv += ["--device", device, "--min_run_time", str(run_time)]
                if check.dry_run:
                    argv += ["--max_run_time", str(run_time)]
                if check.dry_run and "segmentation" in config:
                    argv += ["--input_size", "[64, 128]"]
                check.say(f"refvision {' '.join(argv)}")
                printed = io.StringIO()
                try:
                    with contextlib.redirect_stdout(printed):
                        refvision_main(argv)
                except (Exception, SystemExit) as err:  # noqa: BLE001  one failure must not lose the others
                    if check.dry_run:
                        raise
                    printed.write(f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n")
                table = printed.getvalue()
                text.append(f"### {model}, {method}\n\n```\n{table.rstrip()}\n```\n")
                match = re.search(r"latency ms \(median, \w+\)\s+([\d.]+)\s+([\d.]+)", table)
                size = re.search(r"input 3x(\d+x\d+)", table)
                if match and size:
                    profiled[model, method] = Profiled(float(match[1]), float(match[2]), size[1])
                if device == "cuda":
                    torch.cuda.empty_cache()
    (check.out / "profile.log").write_text("\n".join(text))
    return "\n".join(text), profiled


def published(rows: list[dict], profiled: dict[tuple[str, str], Profiled]) -> str:
    """The comparison with the published numbers: SSD300 baseline fp32 s/iter at batch 32, and the
    DeepLabV3+ R-50 deploy form of RefConv (the plain architecture) in frames/s, batch 1."""
    ssd = [r for r in rows if r["model"] == "SSD300-VGG16" and r["form"] == "baseline" and r["excluded"]]
    ssd300 = "not measured"
    if ssd:
        best = {r["precision"] + (" channels_last" if r["channels_last"] else ""): r for r in ssd}
        ssd300 = "; ".join(
            f"{name}: {r['batch'] / r['excluded']:.3f} (loader excluded), {r['batch'] / r['included']:.3f} "
            f"(included), batch {r['batch']}"
            for name, r in best.items()
        )
    deploy = profiled.get(("DeepLabV3+ ResNet-50", "RefConv"))
    deeplab = (
        f"{1000 / deploy.deploy_ms:.2f} (deploy form, batch 1, whole {deploy.input_size} image)"
        if deploy
        else "not measured"
    )
    return PUBLISHED.format(ssd300=ssd300, deeplab=deeplab)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="walk every step on CPU at tiny sizes")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: error: no CUDA device is present (torch.cuda.is_available() is False); "
            "nothing was run (--dry-run walks the check on CPU)",
            file=sys.stderr,
        )
        return 1
    out = args.out or Path(os.environ.get("OUT") or REPO / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.dry_run)
    device = "cpu" if args.dry_run else "cuda"
    dry = ["--dry-run"] if args.dry_run else []
    check.say(f"results in {out}; {device_description()}")

    tests = run_tests(check)
    check.run(
        "DRConv vs dense",
        ["benchmarks/drconv_vs_dense.py", "--device", device, "--reps", "5", *dry],
        "drconv_vs_dense.log",
        DRCONV_TIMEOUT_S,
    )
    # The dry run walks every row whatever it takes (on a loaded 2-core machine, many minutes).
    budget = math.inf if args.dry_run else THROUGHPUT_BUDGET_S
    check.run(
        "training throughput",
        [
            "benchmarks/train_throughput.py",
            "--device",
            device,
            "--budget",
            str(budget),
            "--out",
            str(out / "throughput.md"),
            "--json",
            str(out / "throughput.json"),
            *dry,
        ],
        "throughput.log",
        None if args.dry_run else budget + 120,
    )
    start = time.perf_counter()
    profiles, profiled = run_profiles(check, device)
    check.steps.append(("refvision profile", "see profile.log", time.perf_counter() - start))

    throughput = out / "throughput.md"
    rows = json.loads((out / "throughput.json").read_text()) if (out / "throughput.json").is_file() else []
    precisions = "bf16 = autocast.\n" if args.dry_run else PRECISIONS_NOTE
    report = [
        "# refvision GPU check\n",
        f"Device: {device_description()}. PyTorch {torch.__version__}. {time.strftime('%Y-%m-%d %H:%M %Z')}.\n",
        *([DRY_RUN_NOTE] if args.dry_run else []),
        "| step | result | seconds |",
        "|---|---|---:|",
        *[f"| {name} | {result} | {took:.0f} |" for name, result, took in check.steps],
        f"\nCUDA tests: `{tests}`\n",
        "## Training throughput\n",
        precisions,
        throughput.read_text() if throughput.is_file() else "not written (see throughput.log)\n",
        published(rows, profiled),
        "## DRConv vs dense (benchmarks/drconv_vs_dense.py)\n",
        f"```\n{(out / 'drconv_vs_dense.log').read_text().rstrip()}\n```\n",
        "## refvision profile (latency of train and deploy forms)\n",
        profiles,
    ]
    (out / "gpu-check.md").write_text("\n".join(report))
    check.say(f"wrote {out / 'gpu-check.md'}" + (f"; failed: {', '.join(check.failed)}" if check.failed else ""))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
