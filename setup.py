"""Build hook: a built wheel carries the top-level ``configs/`` folder as ``refvision/configs``.

The configs stay one folder at the top of the repository (``-c configs/...`` from a clone); a
wheel copies them in at build time, as MMDetection's build does with its configs.
``refvision.app.configs.config_root`` finds them in either place. Everything else is declared
in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            source = Path(__file__).resolve().parent / "configs"
            shutil.copytree(source, Path(self.build_lib) / "refvision" / "configs", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConfigs})
