#!/usr/bin/env bash
# Set up this machine (as scripts/setup.sh), build the AI images, and bring up the
# reference AI stack (manifests/ai-semble.yaml) on the embedded store; then print
# how to call it. Idempotent: run it again at any time.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
aisemble=.venv/bin/aisemble

echo "==> building the AI images (the first time takes a few minutes; later runs skip them)"
"$aisemble" images build

# The gateway answers only callers with an API key, kept in podman's secret store. The
# key is made here once, piped (never on a command line, never printed).
if ! "$aisemble" secret get ai-semble-gateway api-key >/dev/null 2>&1; then
  echo "==> creating the gateway's API key (secret ai-semble-gateway, key api-key)"
  .venv/bin/python -c 'import secrets; print("sk-" + secrets.token_urlsafe(32), end="")' |
    "$aisemble" secret create ai-semble-gateway --from-file api-key=/dev/stdin
fi

echo "==> applying manifests/ai-semble.yaml"
"$aisemble" apply -f manifests/ai-semble.yaml

# The LLM service serves whatever model is in the `models` volume under llm/. Without
# one, put the demo model there: random weights and a small trained tokenizer, so
# answers are nonsense, but every route works. Replace it with a real model directory
# (saved with save_pretrained) for real answers.
volume=aisemble_default_ai-semble_models
llm_image=localhost/aisemble/llm:latest
if ! podman run --rm --network none -v "$volume:/models:ro" "$llm_image" test -f /models/llm/config.json; then
  echo "==> no model in the models volume: writing the demo model (random weights)"
  podman run --rm --network none -v "$volume:/models" "$llm_image" sh -c \
    'python -m aisemble.services.llm.tinymodel /models/.llm-new && mv /models/.llm-new /models/llm'
fi

echo "==> waiting for the gateway to be ready (models load)"
for _ in $(seq 1 180); do
  if curl -fsS -o /dev/null http://127.0.0.1:8080/ready; then ready=1; break; fi
  sleep 1
done
if [[ -z "${ready:-}" ]]; then
  echo "the gateway is not ready after 3 minutes:" >&2
  curl -sS http://127.0.0.1:8080/ready >&2 || true
  echo >&2
  echo "see: $aisemble describe ai-semble" >&2
  exit 1
fi

cat <<'MSG'

The AI stack is up on http://127.0.0.1:8080. Every route but /health, /ready and
/metrics needs the API key; read it (the only command that prints it) with:

  key=$(.venv/bin/aisemble secret get ai-semble-gateway api-key)

Then try:

  curl -s localhost:8080/ai/llm/completion -H "Authorization: Bearer $key" \
       -H 'content-type: application/json' -d '{"prompt": "Once upon a time", "max_tokens": 20}'
  curl -s localhost:8080/ai/nlp/analyze -H "Authorization: Bearer $key" \
       -H 'content-type: application/json' \
       -d '{"text": "What a wonderful day!", "tasks": ["sentiment", "stats"]}'
  curl -s localhost:8080/v1/embeddings -H "Authorization: Bearer $key" \
       -H 'content-type: application/json' -d '{"model": "all-MiniLM-L6-v2", "input": "hello"}'
  curl -s localhost:8080/v1/models -H "Authorization: Bearer $key"

  # any OpenAI client works with the base URL and the key:
  #   OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=key)

  .venv/bin/aisemble get                  # the stack's status
  .venv/bin/aisemble describe ai-semble   # services, pods, events
  .venv/bin/aisemble delete ai-semble     # stop it (volumes and models are kept)
MSG
