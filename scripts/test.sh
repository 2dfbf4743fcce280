#!/usr/bin/env bash
# Create the environment, install, lint and run the whole test suite (README command 2, CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# constraints.txt pins torch to the local CPU wheel: an unpinned torch pulls a CUDA build.
.venv/bin/pip install -q -c constraints.txt -e '.[test]'
# Browser tests drive Debian's Chromium; playwright never downloads a browser of its own.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "warning: could not install chromium; browser tests will be skipped" >&2
fi
.venv/bin/ruff check .
# The layers, the product/test-kit split and acyclic packages ([tool.importlinter]).
.venv/bin/lint-imports
# The wheel, installed (not editable) in a clean venv, must work from outside the checkout.
bash scripts/wheel_check.sh
exec .venv/bin/python -m pytest "$@"
