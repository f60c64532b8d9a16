"""Stage: a model (or LoRA adapter) from the Hugging Face Hub or S3 into the model store, streamed, verified,
resumable; and finding what is staged. Imports tasks.core and blocks."""
