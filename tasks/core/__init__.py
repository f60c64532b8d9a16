"""Shared by every room: AWS clients (one factory), errors and retry rules, names and tags, S3, the state record,
secrets, the endpoint client, markdown for artifacts. Imports only `blocks` and the standard/third-party libraries."""
