#!/usr/bin/env bash
# Set up (as scripts/setup.sh) and bring up the demo stack on the embedded store.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/aisemble apply -f manifests/demo.yaml
cat <<'MSG'

The demo stack is up. Try:
  curl http://127.0.0.1:8080/
  .venv/bin/aisemble get
  .venv/bin/aisemble describe demo
  podman pod ps --filter label=aisemble.io/stack=demo
  .venv/bin/aisemble delete demo
MSG
