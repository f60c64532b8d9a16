"""The stack's tool gateway as the pipeline deploys it: tool sets and tenant keys, the same on both targets."""
