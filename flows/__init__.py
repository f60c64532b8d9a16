"""One flow per user-facing job; flows compose tasks and make no AWS calls of their own."""
