#!/usr/bin/env bash
# CI step: build the wheel, install it (not editable) into a clean venv, and run the
# installed tool from outside the checkout: `rules test`, `db upgrade`, an HTML render and
# a site build. Proves rules/, templates/ and alembic/ ship inside the package.
#
# Fast and offline: the wheel is built without build isolation, and the clean venv sees
# the dependencies already installed in .venv through a folder of links (everything but
# auditor itself), so nothing is downloaded and the checkout is never on sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="$REPO/.venv/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/auditor-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip wheel "$REPO" -w "$WORK/whl" --no-deps --no-build-isolation -q
"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DEPS_SRC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$WORK/deps"
for entry in "$DEPS_SRC"/*; do
  case "$(basename "$entry")" in
    auditor|auditor-*|__editable__*|_virtualenv*|distutils-precedence.pth) ;;
    *) ln -s "$entry" "$WORK/deps/" ;;
  esac
done
echo "$WORK/deps" > "$SITE/_auditor_ci_deps.pth"
"$PY" -m pip --python "$VPY" install -q --no-deps --no-index "$WORK"/whl/auditor-*.whl

cd "$WORK"  # outside the checkout: only the installed package can answer
export PATH="$WORK/venv/bin:$PATH" AUDITOR_DATA_DIR="$WORK/data" HF_HOME="$WORK/hf"
unset AUDITOR_RULES_DIR AUDITOR_DATABASE_URL
"$VPY" - <<'PY'
import auditor, auditor.resources as r
where = r.resource_path("rules")
assert "_shipped" in str(where) and where.is_dir(), where
print("installed at", auditor.__file__)
PY
auditor rules list >/dev/null
auditor rules test
auditor db upgrade --url "sqlite:///$WORK/check.db"
"$VPY" - <<'PY'
from auditor.schema import (AuditReport, BackdoorInfo, Finding, MergeInfo, ProtectionInfo,
                            Severity, SubjectRef)
report = AuditReport(
    tool_version="0", analysis_version="0",
    subject=SubjectRef(repo_id="ci/wheel-check", revision="0" * 40, owner="ci"),
    lineage=[], merge=MergeInfo(is_merge=False), backdoor=BackdoorInfo(suspected=False),
    protection=ProtectionInfo(),
    findings=[Finding(rule_id="AUD101", severity=Severity.HIGH, title="t", message="m")])
open("report.json", "w").write(report.model_dump_json())
PY
auditor report render report.json --format html --output report.html
grep -q "ci/wheel-check" report.html
AUDITOR_DATABASE_URL="sqlite:///$WORK/check.db" auditor report build --output site >/dev/null
test -s site/index.html
echo "wheel check: OK ($(basename "$WORK"/whl/auditor-*.whl))"
