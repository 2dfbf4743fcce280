"""The deployment files pass a syntax and configuration check: the systemd unit through
systemd-analyze (when present) and a parse, the compose file's services and wiring, the
Dockerfile's instructions, and the README section that explains them."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
AUDITOR_SERVICES = {"migrate", "daemon", "site-builder"}


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "auditor-daemon.service", encoding="utf-8")
    return parser


def test_systemd_unit_parses_and_runs_the_daemon() -> None:
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["ExecStart"].split()[:2] == ["/opt/auditor/venv/bin/auditor", "daemon"]
    assert service["ExecStartPre"].endswith("auditor db upgrade")
    assert service["User"] != "root" and service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert "EnvironmentFile" in service  # secrets stay out of the unit
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "TOKEN" not in (DEPLOY / "auditor-daemon.service").read_text().split("[Service]")[1] \
        .replace("HF_TOKEN or AUDITOR_HUB_TOKEN", "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify checks that the executables exist: point them at this checkout's auditor.
    auditor = shutil.which("auditor") or str(REPO / ".venv" / "bin" / "auditor")
    text = (DEPLOY / "auditor-daemon.service").read_text(encoding="utf-8")
    unit = tmp_path / "auditor-daemon.service"
    unit.write_text(text.replace("/opt/auditor/venv/bin/auditor", auditor), encoding="utf-8")
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if unit.name in line]
    assert done.returncode == 0 and complaints == [], complaints
    # The check does catch mistakes (so a clean result means something).
    bad = tmp_path / "bad.service"
    bad.write_text(text.replace("Restart=on-failure", "Restart=sometimes")
                   .replace("/opt/auditor/venv/bin/auditor", auditor), encoding="utf-8")
    out = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True,
                         text=True, timeout=60)
    assert "bad.service" in out.stdout + out.stderr


def test_compose_has_the_services_and_wiring() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"db", "web", *AUDITOR_SERVICES} <= set(services)
    assert services["db"]["image"].startswith("postgres:")
    assert "healthcheck" in services["db"]
    for name in AUDITOR_SERVICES:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        env = svc["environment"]
        assert env["AUDITOR_DATABASE_URL"].startswith("postgresql+psycopg://auditor:"), name
        assert "@db:5432/auditor" in env["AUDITOR_DATABASE_URL"]
        assert env["HF_TOKEN"] == "${HF_TOKEN:-}"  # from the environment, never written here
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["daemon"]["command"][0] == "daemon"
    assert services["daemon"]["depends_on"]["migrate"]["condition"] == \
        "service_completed_successfully"
    assert "auditor report build --output /srv/site/next" in services["site-builder"]["command"][0]
    web = services["web"]
    assert any(v.startswith("site:/srv/site") and v.endswith(":ro") for v in web["volumes"])
    assert (DEPLOY / "nginx.conf").is_file()
    assert set(compose["volumes"]) >= {"pg-data", "site", "hub-cache"}
    # The shared block other services (workers) can reuse.
    assert "x-auditor" in compose


_DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY",
                        "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD",
                        "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def _docker_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word, rest.strip()))
    return out


def test_dockerfile_parses_and_builds_a_non_root_wheel_install() -> None:
    steps = _docker_instructions((DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    assert all(word in _DOCKER_INSTRUCTIONS for word, _ in steps), steps
    assert steps[0][0] in ("FROM", "ARG")
    assert sum(w == "FROM" for w, _ in steps) == 2  # build stage + runtime stage
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            src = rest.split()[0]
            assert (REPO / src).exists(), f"COPY of a missing path: {src}"
        assert word != "ADD"  # COPY only: nothing fetched from URLs
    runs = " ".join(rest for w, rest in steps if w == "RUN")
    assert "pip wheel" in runs and "-c constraints.txt" in runs and "-e " not in runs
    users = [rest for w, rest in steps if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(w == "ENTRYPOINT" and "auditor" in rest for w, rest in steps)


def test_readme_explains_deployment() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    for needle in ("CREATE DATABASE", "auditor db upgrade", "HF_TOKEN", "read", "rate limit",
                   "AUDITOR_DISK_BUDGET_BYTES", "7B", "deploy/auditor-daemon.service",
                   "deploy/compose.yaml", "report build", "--fail-on"):
        assert needle in section, needle
