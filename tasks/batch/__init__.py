"""Batch: OpenAI Batch JSONL in S3 to output and errors in S3, exactly once -- online against a running server,
or offline through vLLM's run_batch in a one-off job (the job itself runs on a target). Imports tasks.core and blocks."""
