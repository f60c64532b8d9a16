"""Collect real model outputs for the BFCL agreement test (tests/test_bfcl_agreement.py).

Serves the default model (SmolLM2-135M-Instruct) and its tool-calling LoRA adapter on the local
vLLM server, asks each a deterministic sample of BFCL's own questions (from the oracle
environment's bfcl-eval package: .venv-bfcl), and writes every answer's tool calls, as the
server returned them, to smollm2_outputs.jsonl beside this script. Run it again only to refresh
that file (a few minutes on 2 cores):

    flock /tmp/heavy.lock .venv/bin/python tests/data/bfcl/collect_smollm2_outputs.py
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from blocks.vllm_server import VllmServerSettings  # noqa: E402
from embedded.model_kit import ensure_default_model, vllm_python  # noqa: E402
from embedded.net import free_port  # noqa: E402
from tasks.validation.bfcl import to_tools  # noqa: E402

OUT = Path(__file__).with_name("smollm2_outputs.jsonl")
ADAPTER = "smollm2-135m-tools"
SAMPLE = {"simple_python": 24, "multiple": 12, "parallel": 12, "parallel_multiple": 6, "live_simple": 16, "live_multiple": 8}
MAX_DOC_CHARS = 1800  # keep prompts well inside the 2048-token context


def bfcl_data() -> Path:
    found = glob.glob(str(REPO / ".venv-bfcl" / "lib" / "python3*" / "site-packages" / "bfcl_eval" / "data"))
    if not found:
        sys.exit("no .venv-bfcl: run scripts/setup.sh")
    return Path(found[0])


def sample() -> list[dict]:
    data, rng, picked = bfcl_data(), random.Random(20), []
    for category, n in SAMPLE.items():
        questions = [json.loads(line) for line in (data / f"BFCL_v4_{category}.json").open()]
        answers = {a["id"]: a["ground_truth"] for a in map(json.loads, (data / "possible_answer" / f"BFCL_v4_{category}.json").open())}
        fits = [q for q in questions if len(json.dumps(q["function"])) <= MAX_DOC_CHARS and len(q["question"]) == 1]
        for q in rng.sample(fits, n):
            picked.append({"id": q["id"], "category": category, "question": q["question"], "functions": q["function"],
                           "possible_answer": answers[q["id"]]})
    return picked


def ask(http: httpx.Client, url: str, model: str, tool_choice: str, case: dict) -> dict:
    tools = to_tools(case["functions"])
    body = {"model": model, "messages": case["question"][0], "temperature": 0, "max_tokens": 256, "tool_choice": tool_choice,
            "tools": [{"type": "function", "function": {"name": n, **spec}} for n, spec in tools.items()]}
    reply = http.post(f"{url}/v1/chat/completions", json=body)
    message = reply.json()["choices"][0]["message"] if reply.status_code == 200 else {}
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message.get("tool_calls") or []]
    return {**{k: case[k] for k in ("id", "category", "functions", "possible_answer")}, "served": model,
            "tool_choice": tool_choice, "status": reply.status_code, "calls": calls}


def main() -> None:
    cases = sample()
    model_dir = ensure_default_model()
    port = free_port()
    settings = VllmServerSettings(enforce_eager=True, enable_lora=True, max_lora_rank=8)
    args = settings.server_args(model_path=model_dir, host="127.0.0.1", port=port)
    args += ["--lora-modules", f"{ADAPTER}={REPO / 'embedded' / 'adapters' / 'smollm2-tool-calling'}"]
    log = open("/tmp/bfcl-collect-server.log", "wb")  # noqa: SIM115
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", *args], stdout=log,
                              stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=300) as http:
            for _ in range(600):
                if server.poll() is not None:
                    sys.exit("server exited; see /tmp/bfcl-collect-server.log")
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            jobs = [(settings.served_model_name, "required", c) for c in cases] + [(ADAPTER, "auto", c) for c in cases]
            with ThreadPoolExecutor(max_workers=4) as pool:
                rows = list(pool.map(lambda j: ask(http, url, *j), jobs))
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)
    with OUT.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} answers ({sum(bool(r['calls']) for r in rows)} with tool calls) to {OUT}")


if __name__ == "__main__":
    main()
