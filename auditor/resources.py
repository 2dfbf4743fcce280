"""Where the data files live: rules/, templates/, alembic/ and alembic.ini.

In a source checkout (editable install, tests, CI) they are read from the repository top,
where developers edit them. A wheel or ``pip install .`` ships copies inside the package
(``auditor/_shipped/``, put there by the build hook in ``setup.py``), so an installed tool
works without the checkout.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import auditor

SHIPPED = ("rules", "templates", "alembic", "alembic.ini")
_PACKAGE = Path(auditor.__file__).resolve().parent


@cache
def resource_path(name: str) -> Path:
    """The path of shipped data ``name`` (one of ``SHIPPED``)."""
    if name not in SHIPPED:
        raise ValueError(f"not a shipped resource: {name!r}")
    source = _PACKAGE.parent / name
    # A checkout is recognised by its pyproject.toml next to the package.
    if (_PACKAGE.parent / "pyproject.toml").is_file() and source.exists():
        return source
    return _PACKAGE / "_shipped" / name


def source_root() -> Path:
    """The directory ``rules/`` paths are shown relative to (checkout or package)."""
    return resource_path("rules").parent
