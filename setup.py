"""Build hook: ship the top-level rules/, templates/ and alembic/ inside the package.

setuptools only packages files that live in a package, and these folders stay at the
repository top where developers edit them. ``build_py`` copies them into
``auditor/_shipped/`` of the build, so wheels and ``pip install .`` carry them;
``auditor.resources`` finds them there when no checkout is around.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHIPPED = ("rules", "templates", "alembic", "alembic.ini")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads them from the checkout
        target = Path(self.build_lib) / "auditor" / "_shipped"
        for name in SHIPPED:
            src = HERE / name
            dst = target / name
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=_IGNORE)
            else:
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildWithData})
