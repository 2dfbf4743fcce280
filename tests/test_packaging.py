"""Rules, templates and migrations ship inside the package (setup.py's build hook), and
the code finds them in a checkout or, installed, in auditor/_shipped. The full check (a
wheel installed in a clean venv, run from outside the checkout) is scripts/wheel_check.sh,
a CI step of scripts/test.sh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import auditor
from auditor import resources

REPO = Path(auditor.__file__).resolve().parent.parent


def test_build_hook_copies_the_data_into_the_package(tmp_path: Path) -> None:
    out = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)],
                   cwd=REPO, check=True, capture_output=True)
    shipped = out / "auditor" / "_shipped"
    for name in ("rules", "templates", "alembic"):
        src = sorted(p.relative_to(REPO / name) for p in (REPO / name).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
        got = sorted(p.relative_to(shipped / name) for p in (shipped / name).rglob("*")
                     if p.is_file())
        assert src and got == src, name
    assert (shipped / "alembic.ini").is_file()
    assert (out / "auditor" / "resources.py").is_file()


def test_checkout_resources_come_from_the_repo_top() -> None:
    for name in resources.SHIPPED:
        assert resources.resource_path(name) == REPO / name


def test_installed_layout_falls_back_to_shipped(tmp_path: Path) -> None:
    # A package directory without a pyproject.toml beside it: an installed package.
    pkg = tmp_path / "site-packages" / "auditor"
    (pkg / "_shipped" / "rules").mkdir(parents=True)
    code = (
        "import auditor.resources as r, pathlib;"
        f"r._PACKAGE = pathlib.Path({str(pkg)!r}); r.resource_path.cache_clear();"
        "print(r.resource_path('rules'))"
    )
    got = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert got == str(pkg / "_shipped" / "rules")
