"""``refvision study``: parse a study config, then run one run (``--index``), all of them, or ``aggregate``."""

from argparse import ArgumentError
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from refvision.app.study.aggregate import aggregate
from refvision.app.study.config import Arm, Study, make_study, plan
from refvision.app.study.runner import read_result, run_index, run_local


def study_parser() -> ArgumentParser:
    """The arguments of ``refvision study`` (see :mod:`refvision.app.study.config` for the config keys)."""
    parser = ArgumentParser(
        prog="refvision study",
        description="Method comparison over seeds: arms x seeds of fit + test, resumable, with paired statistics.",
        exit_on_error=False,
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="study config(s), composed in order")
    parser.add_argument(
        "step", nargs="?", choices=["run", "aggregate"], default="run", help="run the runs (default), or only aggregate"
    )
    parser.add_argument("--root", type=str, required=True, help="the study folder: <root>/<arm>/seed_<s>/")
    parser.add_argument("--metric", type=str, default="test/top1", help="the compared test metric")
    parser.add_argument("--seeds", type=list[int], default=[0, 1, 2])
    parser.add_argument("--configs", type=list[str], default=[], help="task configs every run takes")
    parser.add_argument("--overrides", type=dict[str, object], default={}, help="dotted overrides every run takes")
    parser.add_argument("--start.checkpoint", type=str | None, default=None, help="every arm starts from this file")
    parser.add_argument("--start.baseline", type=Arm | None, default=None, help="or a baseline trained once per seed")
    parser.add_argument(
        "--start.shared_baseline", type=bool, default=False, help="one baseline (the first seed's) for all seeds"
    )
    parser.add_argument(
        "--arms", type=dict[str, Arm], required=True, help="arm name: {configs: [...], overrides: {...}}"
    )
    parser.add_argument("--reference", type=str, required=True, help="the arm the others are compared with")
    parser.add_argument(
        "--index", type=int | None, default=None, help="run only run N of the plan (a job array's task id)"
    )
    parser.add_argument("--jobs", type=int | None, default=None, help="concurrent runs (default: one per GPU, else 1)")
    parser.add_argument("--list", action="store_true", help="print the runs by index and their state, run nothing")
    return parser


def print_plan(study: Study) -> None:
    for index, run in enumerate(plan(study)):
        print(f"{index}\t{run.name}\t{'finished' if read_result(run) else 'to run'}\t{run.folder}")


def study_command(argv: Sequence[str]) -> None:
    parser = study_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as err:  # one line: the cause, without the usage
        raise ValueError(str(err).splitlines()[0]) from None
    values = cfg.as_dict()
    study = make_study(values)
    if cfg.list:
        print_plan(study)
    elif cfg.step == "aggregate":
        aggregate(study)
    elif cfg.index is not None:
        run_index(study, cfg.index)
    else:
        run_local(study, argv, cfg.jobs)
        aggregate(study)
