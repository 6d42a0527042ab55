#!/usr/bin/env bash
# All set-up on a fresh machine, idempotent: the project venv (.venv) and Label Studio's own venv.
# Label Studio pins redis/rq/pytz versions that conflict with Celery, so it never shares our venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
LS_VERSION="1.23.2"
LS_VENV="${LABELLOOP_LS_VENV:-$HOME/.cache/labelloop/label-studio-$LS_VERSION}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp=.venv/.labelloop-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> project venv (.venv): torch 2.14.1 + torchvision 0.29.1 + ultralytics + service deps (~3 min the first time)"
    "$PYTHON" -m venv .venv
    .venv/bin/pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import labelloop, torch, torchvision, ultralytics, label_studio_sdk, celery, fastapi" \
        || { echo "project venv is broken; see the pip output above" >&2; exit 1; }
    touch "$stamp"
fi

if ! command -v redis-server >/dev/null; then
    echo "==> redis-server (Debian package)"
    apt-get install -y -q redis-server >/dev/null || { echo "install redis-server (Debian: apt-get install redis-server)" >&2; exit 1; }
fi

if [ ! -x "$LS_VENV/bin/label-studio" ]; then
    echo "==> Label Studio $LS_VERSION in its own venv ($LS_VENV, ~2 min the first time)"
    rm -rf "$LS_VENV"
    mkdir -p "$(dirname "$LS_VENV")"
    "$PYTHON" -m venv "$LS_VENV"
    "$LS_VENV/bin/pip" install -q "label-studio==$LS_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
    [ -x "$LS_VENV/bin/label-studio" ] || { echo "Label Studio install failed" >&2; exit 1; }
fi
