"""The Docker docs say what the Dockerfile does: its base image and the host driver its CUDA needs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
DOCKER_README = (REPO / "docker" / "README.md").read_text()

MINIMUM_DRIVER = {12: 525, 13: 580}
"""Oldest Linux driver of each CUDA major version (NVIDIA's CUDA Toolkit release notes, table 3:
minor-version compatibility)."""


def _build_section() -> str:
    return DOCKER_README.split("## Build", 1)[1].split("\n## ", 1)[0]


def test_build_section_states_the_host_driver_the_image_requires() -> None:
    major, minor = map(int, re.findall(r'NVIDIA_REQUIRE_CUDA="cuda>=(\d+)\.(\d+)"', DOCKERFILE)[0])
    head = _build_section().split("```", 1)[0]  # before the first command: where a reader starts
    assert f"driver >= {MINIMUM_DRIVER[major]}" in head
    assert f"CUDA {major}.{minor}" in head


def test_docker_readme_names_the_dockerfiles_base_image_and_no_other() -> None:
    base = re.findall(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, re.MULTILINE)[0]
    assert f"`{base}`" in _build_section()
    named = set(re.findall(r"\b(?:nvidia/cuda|debian|ubuntu):[\w.-]+", DOCKER_README))
    assert named == {base}, named
