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
# The Celery tests need RabbitMQ at 127.0.0.1:5672 (and its rabbitmq-server for a private
# node with a short consumer_timeout): install and start it when it is not running.
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up && [ "$(id -u)" = 0 ]; then
  if ! command -v rabbitmq-server >/dev/null && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null) \
      || echo "warning: could not install rabbitmq-server" >&2
  fi
  if command -v rabbitmq-server >/dev/null; then
    (service rabbitmq-server start || rabbitmq-server -detached) >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do rabbit_up && break; sleep 1; done
  fi
fi
rabbit_up || echo "warning: RabbitMQ is not reachable at 127.0.0.1:5672; the Celery tests will be skipped (the skip says why)" >&2
.venv/bin/ruff check .
# The layers, the product/test-kit split and acyclic packages ([tool.importlinter]).
.venv/bin/lint-imports
# The wheel, installed (not editable) in a clean venv, must work from outside the checkout.
bash scripts/wheel_check.sh
exec .venv/bin/python -m pytest "$@"
