"""The Docker image: lint, invariants, what it runs, and a real build where an engine is at hand.

The Dockerfile is linted with hadolint and parsed for its contract (non-root, ``refvision``
entrypoint, pinned installs from Debian and the lock, volumes); the commands the image runs are
run here from the project's virtual environment; the build context is rebuilt from
``.dockerignore`` and the wheel the image would install is built from it offline. Where a Docker
engine answers and the local Debian bookworm base image exists (``docker/README.md`` says how to
make one), the image is built through ``BASE_IMAGE`` and run; otherwise that test is skipped and
says why.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _parse(path: Path) -> list[list[tuple[str, str]]]:
    """``[(INSTRUCTION, arguments)]``: first what precedes the first ``FROM``, then one list per
    build stage; continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        instruction, _, args = logical.strip().partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), " ".join(args.split())))
    return stages


def _instructions(path: Path) -> list[list[tuple[str, str]]]:
    """The build stages of :func:`_parse`."""
    return _parse(path)[1:]


def _global_args() -> dict[str, str]:
    """The ``ARG name=default`` lines before the first ``FROM``."""
    return dict(args.partition("=")[::2] for instruction, args in _parse(DOCKERFILE)[0] if instruction == "ARG")


def _final_stage() -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}
    for instruction, args in _instructions(DOCKERFILE)[-1]:
        by_name.setdefault(instruction, []).append(args)
    return by_name


def test_hadolint_is_clean(tmp_path: Path) -> None:
    # A config that ignores nothing and no inline pragmas: nothing can be silenced; every level fails.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    done = subprocess.run(
        [
            str(BIN / "hadolint"),
            "--no-color",
            "--config",
            str(config),
            "--failure-threshold",
            "style",
            "--disable-ignore-pragma",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_final_stage_contract() -> None:
    stages = _instructions(DOCKERFILE)
    final = [instruction for instruction, _ in stages[-1]]
    stage = _final_stage()
    user = stage["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert final.index("USER") < final.index("ENTRYPOINT")
    assert json.loads(stage["ENTRYPOINT"][-1]) == ["refvision"]
    assert json.loads(stage["CMD"][-1]) == ["--help"]
    volumes = {v for args in stage["VOLUME"] for v in json.loads(args)}
    assert {"/data", "/runs"} <= volumes
    assert stage["WORKDIR"][-1] == "/workspace"
    assert not any(args.startswith(". ") for args in stage.get("COPY", [])), "no sources in the final stage"
    # Only the volumes are writable: outputs cannot silently land in the container's /workspace.
    (owned,) = re.findall(r"chown -R \S+ ((?:/\S+ ?)+)", " ".join(stage["RUN"]))
    assert sorted(owned.split()) == ["/data", "/runs"]


def test_build_installs_the_whole_context_from_the_lock() -> None:
    (build,) = [stage for stage in _instructions(DOCKERFILE) if any("pip install" in a for _, a in stage)]
    install = next(args for instruction, args in build if instruction == "RUN" and "pip install" in args)
    assert re.search(r"pip install (\S+ )*-c requirements\.lock( \S+)* \"\.\[export\]\"", install), install
    # setup.py copies the top-level configs/ into the wheel: the whole context.
    assert ("COPY", ". .") in build


def _apt_installs() -> dict[str, str]:
    """``{package: version}`` of every ``apt-get install`` in the Dockerfile."""
    run = " ".join(args for stage in _instructions(DOCKERFILE) for instruction, args in stage if instruction == "RUN")
    installs = re.findall(r"apt-get install ((?:-\S+ )*)((?:[a-z0-9.+-]+(?:=\S+)? ?)+)", run)
    assert installs, "no apt-get install found"
    packages = [p for _, names in installs for p in names.split()]
    unpinned = [p for p in packages if "=" not in p]
    assert not unpinned, f"apt packages without a version: {unpinned}"
    return dict(p.partition("=")[::2] for p in packages)


def test_python_is_the_locked_interpreter_from_debian() -> None:
    # requirements.lock is `pip freeze` of this virtual environment (see the Makefile's lock target):
    # the image's python is the Debian package of the same minor version, pinned, and nothing
    # else installs an interpreter.
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    apt = _apt_installs()
    assert apt[f"python{minor}"] == apt[f"python{minor}-venv"]
    run = " ".join(args for stage in _instructions(DOCKERFILE) for instruction, args in stage if instruction == "RUN")
    assert f"python{minor} -m venv /opt/venv" in run
    assert not re.search(r"\buv\b|pyenv|conda|curl|wget", DOCKERFILE.read_text()), "Python only from apt"
    for install in re.findall(r"pip install ([^&]*)", run):
        requirements = [a for a in install.split() if not a.startswith("-") and a != "requirements.lock"]
        assert all("==" in r or r == '".[export]"' for r in requirements), install
    final = _final_stage()
    assert "/opt/venv /opt/venv" in " ".join(final["COPY"]), "the venv must reach the final stage"


def test_cuda_requirement_is_the_cuda_of_the_locked_torch() -> None:
    assert _global_args()["BASE_IMAGE"] == "debian:bookworm-slim"
    env = " ".join(args for stage in _instructions(DOCKERFILE) for instruction, args in stage if instruction == "ENV")
    (major, minor) = re.findall(r'NVIDIA_REQUIRE_CUDA="cuda>=(\d+)\.(\d+)"', env)[0]
    lock = dict(line.partition("==")[::2] for line in (REPO / "requirements.lock").read_text().splitlines())
    # torch's own CUDA version (the wheel's build) and the CUDA runtime wheel it loads.
    assert torch.version.cuda == f"{major}.{minor}"
    assert lock["nvidia-cuda-runtime"].split(".")[:2] == [major, minor]
    assert lock["torch"] == torch.__version__.split("+")[0]
    # Every stage builds on the selected base.
    froms = [stage[0][1] for stage in _instructions(DOCKERFILE)]
    assert froms == ["${BASE_IMAGE} AS base", "base AS build", "base"], froms


def test_project_pins_agree_with_the_lock() -> None:
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        lock[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["export"]]:
        name, _, version = re.sub(r"\[.*\]", "", requirement).partition("==")
        assert lock.get(canonicalize_name(name)) == version, requirement


@pytest.mark.parametrize("package", ["torch", "torchvision"])
def test_cpu_index_wheels_satisfy_the_lock(package: str) -> None:
    # The CPU image relies on PEP 440: a pin without a local label accepts `+cpu`, which sorts higher.
    lock = (REPO / "requirements.lock").read_text().splitlines()
    version = next(line for line in lock if line.startswith(f"{package}==")).partition("==")[2]
    assert SpecifierSet(f"=={version}").contains(f"{version}+cpu")
    assert Version(f"{version}+cpu") > Version(version)


def test_default_command_runs_outside_docker() -> None:
    stage = _final_stage()
    command = [str(BIN / json.loads(stage["ENTRYPOINT"][-1])[0]), *json.loads(stage["CMD"][-1])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for subcommand in ("fit", "validate", "test", "predict", "reparameterize", "profile", "demo", "export"):
        assert re.search(rf"\b{subcommand}\b", done.stdout), subcommand


def test_workspace_links_resolve_every_relative_path_of_the_shipped_configs() -> None:
    run = " ".join(_final_stage()["RUN"])
    links = re.findall(r"ln -s (?:\"\$\(.*?\)\"|\S+) /workspace/(\w+)", run)
    assert sorted(links) == ["configs", "data", "runs"]
    # The link target of /workspace/configs is computed without importing refvision (an import at
    # build time would leave cache files under /runs); here it names this environment's purelib.
    (snippet,) = re.findall(r"ln -s \"\$\(python -c '([^']*)'\)\" /workspace/configs", run)
    assert "refvision" not in snippet.split(";")[0]
    configs = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    assert configs == str(Path(sysconfig.get_path("purelib")) / "refvision" / "configs")
    files = sorted((REPO / "configs").glob("*/*.yaml"))
    assert {p.parent.name for p in files} >= {"classification", "detection", "segmentation", "conv"}
    for path in files:
        root = ((yaml.safe_load(path.read_text()).get("data") or {}).get("init_args") or {}).get("root")
        if root and not os.path.isabs(root):
            assert root.split("/")[0] in ("data", "runs"), f"{path}: data.root {root}"


def _dockerignore_matcher() -> re.Pattern[str]:
    """Docker's .dockerignore patterns (root-relative, ``*`` within a segment, ``**`` across)."""
    regexes = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip().strip("/")
        if not pattern or pattern.startswith("#"):
            continue
        assert not pattern.startswith("!"), "exceptions are not modelled here"
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regexes.append(regex)
    return re.compile("|".join(f"(?:{r})" for r in regexes))


def _build_context(target: Path) -> Path:
    ignored = _dockerignore_matcher()

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(REPO)
        return {n for n in names if ignored.fullmatch((rel / n).as_posix().removeprefix("./"))}

    return Path(shutil.copytree(REPO, target, symlinks=True, ignore=ignore))


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    ignored = _dockerignore_matcher()
    for path in (
        ".venv",
        "runs",
        "data",
        ".git",
        "build",
        "refvision.egg-info",
        "refvision/tasks/__pycache__",
        "tests",
        "refvision/nn/__pycache__/x.pyc",
        ".pytest_cache",
    ):
        assert ignored.fullmatch(path), path
    for path in (
        "pyproject.toml",
        "setup.py",
        "requirements.lock",
        "README.md",
        "refvision",
        "refvision/data",
        "refvision/tasks",
        "refvision/tasks/base.py",
        "configs/conv/refconv.yaml",
    ):
        assert not ignored.fullmatch(path), path


def test_wheel_of_the_build_context_ships_tasks_and_configs(tmp_path: Path) -> None:
    context = _build_context(tmp_path / "context")
    assert not (context / "refvision" / "configs").exists()
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            ".",
        ],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("refvision-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"refvision", wheel.name.split("-py")[0] + ".dist-info"}
    for source in sorted((REPO / "refvision" / "tasks").glob("*.py")):
        assert f"refvision/tasks/{source.name}" in names
    for config in sorted((REPO / "configs").glob("*/*.yaml")):
        assert f"refvision/configs/{config.parent.name}/{config.name}" in names
    assert "refvision/export/formats.py" in names


def _fake(bin_dir: Path, name: str, record: Path) -> None:
    """An executable ``name`` that writes its arguments, one a line, to ``record``."""
    script = bin_dir / name
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{record}"\n')
    script.chmod(0o755)


def test_torchrun_script_launches_refvision_with_the_node_topology(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "docker", tmp_path / "docker.args")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "NNODES": "1",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
        "GPUS_PER_NODE": "1",
        "DATA": str(tmp_path / "data"),
        "RUNS": str(tmp_path / "runs"),
    }
    args = ["fit", "-c", "configs/demo/classification.yaml", "--print_config"]
    subprocess.run(["bash", str(REPO / "docker/multinode/torchrun.sh"), *args], env=env, check=True, timeout=60)
    docker = (tmp_path / "docker.args").read_text().splitlines()
    assert docker[:2] == ["run", "--rm"]
    for option in (
        ["--gpus", "all"],
        ["--network", "host"],
        ["--ipc", "host"],
        ["--volume", f"{tmp_path / 'data'}:/data:ro"],
        ["--volume", f"{tmp_path / 'runs'}:/runs"],
    ):
        assert any(docker[i : i + 2] == option for i in range(len(docker))), option
    at = docker.index("--entrypoint")
    entrypoint, image, command = docker[at + 1], docker[at + 2], docker[at + 3 :]
    assert image == "refvision:gpu"
    # What the container runs, run here: torchrun (one node, one process) starts refvision, whose
    # parsed configuration carries the appended topology.
    done = subprocess.run(
        [str(BIN / entrypoint), *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trainer = yaml.safe_load(done.stdout)["trainer"]
    assert (trainer["accelerator"], str(trainer["devices"]), trainer["num_nodes"], trainer["strategy"]) == (
        "gpu",
        "1",
        1,
        "ddp",
    )


def test_slurm_script_runs_one_refvision_per_task_with_the_allocation(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "srun", tmp_path / "srun.args")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "DATA": "/shared/data",
        "RUNS": "/shared/runs",
    }
    subprocess.run(
        ["bash", str(REPO / "docker/multinode/slurm.sbatch"), "fit", "-c", "configs/x.yaml"],
        env=env,
        check=True,
        timeout=60,
    )
    srun = (tmp_path / "srun.args").read_text().splitlines()
    assert srun[:2] == ["apptainer", "exec"]
    assert "--nv" in srun and srun[srun.index("--pwd") + 1] == "/workspace"
    assert srun[srun.index("--bind") + 1] == "/shared/data:/data:ro,/shared/runs:/runs"
    command = srun[srun.index("refvision") :]
    assert command == [
        "refvision",
        "fit",
        "-c",
        "configs/x.yaml",
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        "4",
        "--trainer.num_nodes",
        "2",
        "--trainer.strategy",
        "ddp",
    ]


BASE_IMAGE = os.environ.get("REFVISION_DOCKER_BASE", "refvision-base:bookworm")
"""The local base the build test uses (``docker/README.md``: debootstrap + ``docker import``)."""


def _docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)}: " + done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _skip_without_engine_or_base() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker command on PATH")
    try:
        info = _docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("the Docker engine did not answer `docker info` within 20 s")
    if info.returncode != 0:
        pytest.skip(f"no reachable Docker engine: {info.stderr.strip()[:300]}")
    if _docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        pytest.skip(
            f"local base image {BASE_IMAGE} is absent (make it as docker/README.md says, or set REFVISION_DOCKER_BASE)"
        )


@pytest.mark.slow
def test_image_builds_on_the_local_base_and_runs(tmp_path: Path) -> None:
    _skip_without_engine_or_base()
    tag = "refvision:test"
    _docker(
        "build",
        "-q",
        "-f",
        str(DOCKERFILE),
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "-t",
        tag,
        str(REPO),
        timeout=3600,
    )
    assert _docker("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip() == "1000:1000"
    # No /runs mount: Docker fills an anonymous volume from the image's /runs, which must hold
    # nothing that user 1000 cannot write.
    bare = _docker("run", "--rm", tag, timeout=300)
    for subcommand in ("fit", "test", "reparameterize", "export", "demo"):
        assert re.search(rf"\b{subcommand}\b", bare.stdout), bare.stdout[-2000:]
    # A tiny training run with the data and runs volumes, as the host user: the checkpoint and the
    # deploy checkpoint land on the host.
    from refvision.app.demo.data import write_imagefolder

    data, runs = tmp_path / "data", tmp_path / "runs"
    runs.mkdir()
    write_imagefolder(data / "imagefolder", train_per_class=2, val_per_class=1, size=32)
    mounts = ["--user", f"{os.getuid()}:{os.getgid()}", "-v", f"{data}:/data:ro", "-v", f"{runs}:/runs"]
    assert "fit" in _docker("run", "--rm", *mounts, tag, "--help", timeout=300).stdout
    _docker(
        "run",
        "--rm",
        *mounts,
        "-e",
        "OMP_NUM_THREADS=1",
        tag,
        "fit",
        "-c",
        "configs/demo/classification.yaml",
        "-c",
        "configs/conv/refconv.yaml",
        "--allow_random_basis",
        "true",
        "--data.root",
        "data/imagefolder",
        "--data.image_size",
        "32",
        "--data.resize_size",
        "32",
        "--data.batch_size",
        "4",
        "--model.image_size",
        "32",
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        "runs/tiny",
        timeout=600,
    )
    checkpoints = {p.name for p in (runs / "tiny").rglob("*.ckpt")}
    assert {"best.ckpt", "best-deploy.ckpt"} <= checkpoints, checkpoints
