"""Capacity: which GPU instance and tensor parallelism serve a model, from vLLM's own memory accounting.
Modules: shape (config.json → ModelShape), memory (vLLM's accounting, evaluate), choice (plan), report (markdown), task (Prefect).
Imports tasks.core and blocks."""
