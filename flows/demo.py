"""The one-command demo: the pipeline on the embedded default (moto for AWS, a local hub
serving SmolLM2-135M-Instruct, Prefect's ephemeral server). Leaves nothing running."""

from __future__ import annotations

import sys

from embedded.stack import embedded_stack


def main() -> int:
    print("demo: building the default model (cached after the first run) and starting moto + the local hub", flush=True)
    with embedded_stack() as stack:
        from blocks.model_source import ModelSource
        from blocks.model_store import ModelStore
        from flows.stage import stage_model

        print(f"demo: AWS endpoint {stack.aws.endpoint}, HF_ENDPOINT {stack.hub.endpoint}", flush=True)
        staged = stage_model(repo_id=stack.repo_id)
        again = stage_model(repo_id=stack.repo_id)
        print()
        print(f"staged   {staged.repo_id}@{staged.sha[:12]} -> {staged.s3_uri}")
        print(f"         {staged.files} files, {staged.total_bytes / 1e6:.1f} MB in {staged.seconds:.1f} s")
        print(f"re-stage {again.bytes_uploaded} bytes uploaded (already staged: {again.already_staged})")
    print("\nArtifacts are in Prefect's local database: run `.venv/bin/prefect server start` and open the UI.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
