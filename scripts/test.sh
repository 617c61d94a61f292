#!/usr/bin/env bash
# Set up (as scripts/setup.sh --dev) and run every test against real podman.
# Extra arguments go to pytest, e.g. ./scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --dev
.venv/bin/ruff check --quiet operator tests bench
.venv/bin/lint-imports --config pyproject.toml --no-logo --no-cache
exec .venv/bin/python -m pytest "$@"
