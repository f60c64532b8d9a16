"""Retryable, idempotent units of work, grouped by the system they touch."""
