"""Latency measured in alternating blocks until the spread is small, or reported as noisy."""

import numpy as np
import pytest
import torch
from torch import nn

from refvision.app.cli import main
from refvision.surgery.latency import MIN_BLOCKS, describe_latency_setup, measure_latencies


def _forms() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"train": nn.Conv2d(3, 8, 3).eval(), "deploy": nn.Conv2d(3, 4, 1).eval()}


def test_summary_is_the_median_and_iqr_of_the_blocks_and_every_form_is_timed() -> None:
    lines: list[str] = []
    # No spread target to meet: the measurement stops after the minimum number of rounds.
    result = measure_latencies(
        _forms(), torch.rand(2, 3, 16, 16), spread=float("inf"), min_run_time=1e-9, progress=lines.append
    )
    assert list(result) == ["train", "deploy"]
    for latency in result.values():
        assert len(latency.block_ms) == MIN_BLOCKS and latency.calls_per_block >= 1
        q1, median, q3 = np.percentile(latency.block_ms, [25, 50, 75])
        assert latency.median_ms == pytest.approx(median) and latency.iqr_ms == pytest.approx(q3 - q1)
        assert not latency.noisy
    assert [line.split()[2] for line in lines[:2]] == ["train", "deploy"]


def test_a_spread_target_not_met_by_the_cap_is_reported_noisy() -> None:
    inputs = torch.rand(1, 3, 16, 16)
    result = measure_latencies(_forms(), inputs, spread=1e-12, min_run_time=0.01, max_run_time=0.02)
    assert all(latency.noisy for latency in result.values())
    line = describe_latency_setup(inputs, torch.device("cpu"), result, 1e-12)
    assert line.startswith(f"latency: input 3x16x16, batch 1, {torch.get_num_threads()} threads, cpu;")
    assert "NOISY: train form (IQR" in line and "deploy form (IQR" in line


def test_timing_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["profile", "-c", "configs/demo/classification.yaml", "--min_run_time", "2", "--max_run_time", "1"]
    with pytest.raises(SystemExit, match="expected 0 < min_run_time <= max_run_time"):
        main(args)
