"""Reading a Hugging Face Hub repo: resolve a revision to a commit sha, list and filter its files.

Uses `huggingface_hub` (its errors tell a missing repo from a missing revision from a gated
one); the endpoint is `HF_ENDPOINT` read at call time, so a local hub server works too.
"""

from __future__ import annotations

import fnmatch
import os

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import build_hf_headers, filter_repo_objects
from prefect import task
from pydantic import BaseModel

from blocks.model_source import ModelSource
from tasks.core.errors import PipelineInputError, retry_if_transient

_WEIGHT_FALLBACKS = ("*.bin", "*.pth", "*.pt")


class HubFile(BaseModel):
    path: str
    size: int
    sha256: str | None  # known up front for LFS files; computed while streaming otherwise
    blob_id: str  # git blob sha1 (the Hub's oid), checks non-LFS files
    lfs: bool


class RepoSnapshot(BaseModel):
    repo_id: str
    revision: str
    sha: str
    endpoint: str
    files: list[HubFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_headers(source: ModelSource) -> dict[str, str]:
    token = source.token.get_secret_value() if source.token else False
    return build_hf_headers(token=token)


def select_files(paths: list[str], allow: list[str], ignore: list[str]) -> list[str]:
    """Apply the allow/ignore patterns, then drop *.bin/*.pth weights when safetensors exist."""
    chosen = list(filter_repo_objects(paths, allow_patterns=allow, ignore_patterns=ignore))
    chosen = [p for p in chosen if not p.startswith("original/")]
    if any(p.endswith(".safetensors") for p in chosen):
        chosen = [p for p in chosen if not any(fnmatch.fnmatch(p, pat) for pat in _WEIGHT_FALLBACKS)]
    return sorted(chosen)


def _input_error(source: ModelSource, endpoint: str, exc: HfHubHTTPError) -> PipelineInputError:
    repo, rev = source.repo_id, source.revision
    if isinstance(exc, RevisionNotFoundError):
        return PipelineInputError(f"revision {rev!r} not found in Hub repo {repo!r} ({endpoint})")
    if isinstance(exc, GatedRepoError):
        return PipelineInputError(f"Hub repo {repo!r} is gated or private: set a token with access in the ModelSource block")
    if isinstance(exc, RepositoryNotFoundError) and source.token is None:
        return PipelineInputError(f"Hub repo {repo!r} not found on {endpoint} (if it is private, set a token in the ModelSource block)")
    if isinstance(exc, RepositoryNotFoundError):
        return PipelineInputError(f"Hub repo {repo!r} not found on {endpoint}, or the token has no access to it")
    status = exc.response.status_code if exc.response is not None else 0
    if status in (401, 403):
        return PipelineInputError(f"the Hub refused the token for repo {repo!r} (HTTP {status}): check the ModelSource token")
    return None  # type: ignore[return-value]


@task(name="resolve-hub-revision", retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=retry_if_transient)
def resolve_revision(source: ModelSource) -> RepoSnapshot:
    """Pin the revision to a commit sha and list the files to stage, with sizes and hashes."""
    endpoint = hub_endpoint()
    token = source.token.get_secret_value() if source.token else False
    try:
        info = HfApi(endpoint=endpoint).model_info(source.repo_id, revision=source.revision, files_metadata=True, token=token)
    except HfHubHTTPError as exc:
        err = _input_error(source, endpoint, exc)
        if err is not None:
            raise err from None
        raise
    siblings = {s.rfilename: s for s in info.siblings or []}
    chosen = select_files(list(siblings), source.allow_patterns, source.ignore_patterns)
    if not chosen:
        raise PipelineInputError(
            f"no files of Hub repo {source.repo_id!r} match allow_patterns {source.allow_patterns} minus ignore_patterns {source.ignore_patterns}"
        )
    files = []
    for path in chosen:
        s = siblings[path]
        files.append(
            HubFile(path=path, size=s.size or 0, sha256=s.lfs.sha256 if s.lfs else None, blob_id=s.blob_id or "", lfs=s.lfs is not None)
        )
    return RepoSnapshot(repo_id=source.repo_id, revision=source.revision, sha=info.sha, endpoint=endpoint, files=files)


def file_url(snapshot: RepoSnapshot, path: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(snapshot.repo_id, path, revision=snapshot.sha, endpoint=snapshot.endpoint)
