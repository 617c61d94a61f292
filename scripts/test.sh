#!/usr/bin/env bash
# Set up (as scripts/setup.sh --dev) and run every test against real podman.
# Extra arguments go to pytest, e.g. ./scripts/test.sh tests/unit -x
# As root and without arguments, tests/integration then run a second time as an ordinary
# user with rootless podman (scripts/test-rootless.sh; docs/rootless.md), with a summary of
# their own; the exit status is non-zero if either run fails. AISEMBLE_ROOTLESS=0 leaves
# that run out, AISEMBLE_ROOTLESS=1 adds it to a run with arguments. Run by a user, the
# tests use that user's rootless podman anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
rootless=${AISEMBLE_ROOTLESS:-$(($# == 0))}
[[ $(id -u) -eq 0 ]] || rootless=0
./scripts/setup.sh --dev
.venv/bin/ruff check --quiet operator tests bench
.venv/bin/lint-imports --config pyproject.toml --no-logo --no-cache
# Under a subreaper: podman's DNS server, once dead, must not linger (scripts/subreaper.py).
pytest=(.venv/bin/python scripts/subreaper.py .venv/bin/python -m pytest)
[[ $rootless == 1 ]] || exec "${pytest[@]}" "$@"

status=0
"${pytest[@]}" "$@" || status=$?
# After the root run: it has built the images the rootless run copies.
rootless_status=0
./scripts/test-rootless.sh || rootless_status=$?
echo "==> root run: exit $status; rootless run: exit $rootless_status"
exit $((status != 0 ? status : rootless_status))
