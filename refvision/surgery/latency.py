"""Forward latency of several forms of a model, measured until the spread is small or said to be noisy.

One timing of one form is easily off by tens of percent on a shared CPU (other processes, frequency
scaling, the first form warming caches for the second), so a single median says little and a
comparison of two forms measured one after the other can be inverted. Here the forms are timed in
alternating blocks (each block: ``calls_per_block`` forward calls, CUDA synchronised at both ends by
``torch.utils.benchmark.Timer``), so every form samples the same stretch of machine time, and rounds
continue until the interquartile range of every form's block times is at most ``spread`` of its
median (and ``min_run_time`` has passed), or ``max_run_time`` is reached: then the result says noisy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

MIN_BLOCKS = 5
"""Blocks per form before the spread is judged (fewer make quartiles meaningless)."""


@dataclass(frozen=True)
class Latency:
    """One form's forward time: per-call milliseconds of each timed block, and their summary.

    ``median_ms`` / ``iqr_ms`` are the median and interquartile range of ``block_ms``
    (``statistics.quantiles``, inclusive method); ``noisy``: the IQR exceeded the spread target
    when the time cap stopped the measurement.
    """

    block_ms: tuple[float, ...]
    calls_per_block: int
    median_ms: float
    iqr_ms: float
    noisy: bool

    @property
    def relative_iqr(self) -> float:
        """IQR as a fraction of the median."""
        return self.iqr_ms / self.median_ms


def spread_of(block_ms: tuple[float, ...]) -> tuple[float, float]:
    """``(median, IQR)`` of block times (at least two)."""
    q1, q2, q3 = statistics.quantiles(block_ms, n=4, method="inclusive")
    return q2, q3 - q1


def measure_latencies(
    modules: Mapping[str, nn.Module],
    inputs: Any,
    *,
    spread: float = 0.05,
    min_run_time: float = 1.0,
    max_run_time: float = 20.0,
    block_time: float = 0.05,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Latency]:
    """Time ``module(inputs)`` of every module (on the inputs' device, under ``inference_mode``).

    Each module is warmed up (two calls) and its block size set so that one block takes about
    ``block_time`` s. Then rounds of one block per module run until, after ``min_run_time`` s and
    :data:`MIN_BLOCKS` rounds, every module's IQR is at most ``spread`` times its median; or until
    ``max_run_time`` s, where the modules still above the target are marked ``noisy``. The threads
    are torch's (``torch.get_num_threads()``). ``progress`` is told what runs.
    """
    say = progress or (lambda line: None)
    threads = torch.get_num_threads()
    timers: dict[str, benchmark.Timer] = {}
    calls: dict[str, int] = {}
    times: dict[str, list[float]] = {name: [] for name in modules}
    with torch.inference_mode():
        for name, module in modules.items():
            say(f"timing the {name} form (warm-up)")
            for _ in range(2):
                module(inputs)
            timers[name] = benchmark.Timer(
                stmt="module(inputs)", globals={"module": module, "inputs": inputs}, num_threads=threads
            )
            once = timers[name].timeit(1).mean
            calls[name] = max(1, int(block_time / max(once, 1e-9)))
        say(
            f"timing {' and '.join(modules)} in alternating blocks until the IQR is within {spread:.0%} of "
            f"the median ({min_run_time:g} s at least, {max_run_time:g} s at most)"
        )
        start = time.perf_counter()
        while True:
            for name, timer in timers.items():
                times[name].append(1000 * timer.timeit(calls[name]).mean)
            elapsed = time.perf_counter() - start
            rounds = len(next(iter(times.values())))
            if rounds < MIN_BLOCKS:
                continue
            settled = all(_within(tuple(t), spread) for t in times.values())
            if (settled and elapsed >= min_run_time) or elapsed >= max_run_time:
                break
    result = {}
    for name, block_ms in times.items():
        median, iqr = spread_of(tuple(block_ms))
        result[name] = Latency(tuple(block_ms), calls[name], median, iqr, noisy=iqr > spread * median)
    return result


def _within(block_ms: tuple[float, ...], spread: float) -> bool:
    median, iqr = spread_of(block_ms)
    return iqr <= spread * median


def describe_latency_setup(inputs: Any, device: torch.device, latencies: Mapping[str, Latency], spread: float) -> str:
    """One line: the input shape (``CxHxW``) and batch, threads and device, how the times were taken, and which
    forms stayed noisy (their IQR as a share of the median)."""
    if isinstance(inputs, torch.Tensor):
        batch, shape = inputs.shape[0], "x".join(map(str, inputs.shape[1:]))
    else:  # a list of images of one size
        batch, shape = len(inputs), "x".join(map(str, inputs[0].shape))
    blocks = ", ".join(f"{name} {len(t.block_ms)} x {t.calls_per_block}" for name, t in latencies.items())
    noisy = [f"{name} form (IQR {t.relative_iqr:.0%} of the median)" for name, t in latencies.items() if t.noisy]
    verdict = (
        f"NOISY: {', '.join(noisy)} did not settle within the time cap; close other programs or raise --max_run_time"
        if noisy
        else f"every IQR within {spread:.0%} of its median"
    )
    return (
        f"latency: input {shape}, batch {batch}, {torch.get_num_threads()} threads, {device}; median and IQR of "
        f"per-call times over blocks of calls, forms alternating (blocks x calls: {blocks}); {verdict}"
    )
