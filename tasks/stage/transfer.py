"""Streaming one Hub file into S3: HTTP range reads feed S3 multipart uploads directly.

Bytes never land on disk. Each part is one HTTP Range GET followed by one `upload_part`,
run on a pool of part workers that all the files of one run share (`part_pool`), so a file
downloads and uploads in parallel, a file alone (a one-file model, the last big file) gets
every worker, and a file's CompleteMultipartUpload holds none. Memory is bounded by the
parts in flight, not by the file size. The sha256 is computed in
order as parts arrive, and the multipart upload is completed only when size and hash match
what the Hub advertised: anything else is aborted, so S3 never holds a wrong object under
the final key. A dropped connection costs one part's GET, not the file. A multipart upload
left by a killed run is picked up: parts whose MD5 matches the bytes read are not sent again.

Uploads carry a CRC32 per part, and a multipart upload is created with `ChecksumAlgorithm=CRC32`
and completed with each part's CRC32, as boto3's own `upload_file` does: S3 checks every part
on arrival and keeps a composite checksum for the object. (Created without an algorithm, S3
stand-ins such as moto fall back to a full-object checksum that re-reads the whole object when
the upload completes.)

Downloads use urllib3 (already here through botocore): it streams a large body about twice
as fast as httpx, which matters on small machines where the client's CPU is the limit.
"""

from __future__ import annotations

import base64
import hashlib
import time
import zlib
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Callable

import urllib3
from pydantic import BaseModel, Field

from tasks.core.errors import IntegrityError, PipelineInputError, TransientHttpError
from tasks.stage.hub import HubFile

MiB = 1024 * 1024


class TransferSettings(BaseModel):
    """How much is in flight at once: `streams` = files_in_flight x parts_in_flight part workers,
    shared by the run's files. Memory ~ streams x part size (at most files_in_flight x that,
    when one slow part holds back the in-order hashing of every open file).

    The defaults (2 files, 8 streams of 16 MiB parts, ~128 MiB) keep a 1-2 vCPU flow runner
    busy without thrashing it: there the copy is CPU-bound (TLS, sha256, CRC32), and on the
    2-core bench 16 streams were ~10 % slower than 8. Raise both on a big runner with a fast
    network.
    """

    part_size_mib: int = Field(default=16, ge=5, le=512, description="S3 multipart part size (S3's minimum is 5 MiB).")
    files_in_flight: int = Field(default=2, ge=1, le=64, description="Files started at once.")
    parts_in_flight: int = Field(
        default=4, ge=1, le=64, description="Part workers per file in flight; the run's files share all of them."
    )
    reconnects: int = Field(default=5, ge=0, le=50, description="Retries of one part's download before the file fails.")

    @property
    def streams(self) -> int:
        """Parts downloading/uploading at once across the run."""
        return self.files_in_flight * self.parts_in_flight

    def part_pool(self) -> ThreadPoolExecutor:
        """The part workers one run's files share (shut it down when the run ends)."""
        return ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="part")


class FileResult(BaseModel):
    path: str
    key: str
    size: int
    sha256: str
    bytes_uploaded: int
    skipped: bool = False
    seconds: float = 0.0


def staging_order(files: list[HubFile], settings: TransferSettings) -> list[HubFile]:
    """Files that fit in one part first (one PUT each, milliseconds), then the multipart ones largest first.

    The single-PUT files fill the time the first big parts are still downloading, when S3 has
    nothing else to do, instead of queueing behind the big files' completions at the end; the
    big ones go largest first so the last to finish is a short one.
    """
    part_size = settings.part_size_mib * MiB
    return sorted(files, key=lambda f: (f.size > part_size, -f.size, f.path))


def http_pool(max_connections: int = 16) -> urllib3.PoolManager:
    return urllib3.PoolManager(
        maxsize=max_connections, block=True, retries=False, timeout=urllib3.Timeout(connect=15, read=120)
    )


def fetch_range(
    http: urllib3.PoolManager, url: str, headers: dict[str, str], start: int, end: int, reconnects: int
) -> bytes:
    """Bytes [start, end] of the file (end inclusive; end < start means the whole, empty file)."""
    failures = 0
    want = end - start + 1 if end >= start else 0
    while True:
        req = {**headers, "Accept-Encoding": "identity"}
        if want:
            req["Range"] = f"bytes={start}-{end}"
        try:
            resp = http.request("GET", url, headers=req, redirect=True, preload_content=False)
            try:
                if resp.status in (401, 403, 404):
                    raise PipelineInputError(f"the Hub answered HTTP {resp.status} for {url}")
                if resp.status == 429 or resp.status >= 500:
                    raise TransientHttpError(f"the Hub answered HTTP {resp.status} for {url}")
                if want and resp.status != 206:
                    raise IntegrityError(f"the Hub ignored a Range request for {url} (HTTP {resp.status})")
                data = resp.read()
            finally:
                resp.release_conn()
            if len(data) != want:
                raise TransientHttpError(f"{url}: got {len(data)} bytes of range {start}-{end}")
            return data
        except (urllib3.exceptions.HTTPError, TransientHttpError):
            failures += 1
            if failures > reconnects:
                raise
            time.sleep(min(0.2 * 2**failures, 5))


def _verify(f: HubFile, size: int, sha256: str, git_blob: str | None) -> None:
    if size != f.size:
        raise IntegrityError(f"{f.path}: {size} bytes received, the Hub advertised {f.size}")
    if f.sha256 and sha256 != f.sha256:
        raise IntegrityError(f"{f.path}: sha256 {sha256} does not match the Hub's {f.sha256}")
    if not f.lfs and git_blob is not None and f.blob_id and git_blob != f.blob_id:
        raise IntegrityError(f"{f.path}: git blob id {git_blob} does not match the Hub's {f.blob_id}")


def existing_object_matches(s3, bucket: str, key: str, f: HubFile) -> str | None:
    """The staged object's sha256 if S3 already holds exactly this file, else None."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    meta = head.get("Metadata", {})
    if head.get("ContentLength") != f.size or meta.get("hf-blob-id") != f.blob_id or not meta.get("sha256"):
        return None
    if f.sha256 and meta["sha256"] != f.sha256:
        return None
    return meta["sha256"]


class PrefixScan:
    """What S3 holds under one model's prefix, listed once per run: the keys of its objects and of
    its unfinished multipart uploads. A file absent from both costs no HEAD and no upload listing
    (one request each per file before, ~2 round trips x files on a fresh stage).

    The uploads this run begins are added as they begin, so a retried file still finds the upload
    its first attempt began (and resumes it rather than leaving it behind, billed, beside a new one).
    Shared in-process by the run's file tasks (a plain object, so Prefect passes it as is rather
    than rebuilding it as it may a model); `set.add` is atomic under the GIL.
    """

    def __init__(self, objects: set[str] | None = None, uploads: set[str] | None = None):
        self.objects = objects or set()
        self.uploads = uploads or set()

    @classmethod
    def of(cls, s3, bucket: str, prefix: str) -> "PrefixScan":
        scan = cls()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            scan.objects.update(o["Key"] for o in page.get("Contents", []))
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            scan.uploads.update(u["Key"] for u in page.get("Uploads", []))
        return scan


def stream_file(
    s3,
    http: urllib3.PoolManager,
    url: str,
    headers: dict[str, str],
    bucket: str,
    key: str,
    f: HubFile,
    settings: TransferSettings,
    parts: Executor,
    scan: PrefixScan,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> FileResult:
    """Copy one file into S3; `parts` is the run's shared part pool (`TransferSettings.part_pool`),
    `scan` what the run found under the prefix (`PrefixScan.of`)."""
    started = time.monotonic()
    done_sha = existing_object_matches(s3, bucket, key, f) if key in scan.objects else None
    if done_sha:
        on_bytes(f.size)
        return FileResult(path=f.path, key=key, size=f.size, sha256=done_sha, bytes_uploaded=0, skipped=True)
    part_size = settings.part_size_mib * MiB
    if f.size <= part_size:
        result = _put_small(s3, bucket, key, f, fetch_range(http, url, headers, 0, f.size - 1, settings.reconnects))
        on_bytes(f.size)
    else:
        result = _put_multipart(s3, http, url, headers, bucket, key, f, part_size, settings, parts, scan, on_bytes)
    result.seconds = time.monotonic() - started
    return result


def _put_small(s3, bucket: str, key: str, f: HubFile, data: bytes) -> FileResult:
    sha256 = hashlib.sha256(data).hexdigest()
    blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
    _verify(f, len(data), sha256, blob)
    s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": sha256, "hf-blob-id": f.blob_id})
    return FileResult(path=f.path, key=key, size=len(data), sha256=sha256, bytes_uploaded=len(data))


CHECKSUM = "CRC32"


class _Part(BaseModel):
    etag: str
    size: int
    crc32: str | None = None  # None in an upload begun without a checksum


def _find_upload(s3, bucket: str, key: str) -> tuple[str, str | None, dict[int, _Part]] | None:
    """An unfinished multipart upload for `key`: its id, checksum algorithm and parts by number.

    The algorithm is None for an upload an earlier version of this code created without one;
    such an upload is finished as it was begun, without part checksums in the completion. The
    parts' checksums are not read from the listing (moto's has none): a reused part's bytes are
    read again anyway, and its CRC32 is computed from them.
    """
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    uploads = sorted((u for u in uploads if u["Key"] == key), key=lambda u: u["Initiated"], reverse=True)
    if not uploads:
        return None
    upload_id, algorithm = uploads[0]["UploadId"], uploads[0].get("ChecksumAlgorithm")
    parts: dict[int, _Part] = {}
    for page in s3.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id):
        for p in page.get("Parts", []):
            parts[p["PartNumber"]] = _Part(etag=p["ETag"].strip('"'), size=p["Size"])
    return upload_id, algorithm, parts


def _crc32(data: bytes) -> str:
    """S3's form of a CRC32: the 4 big-endian bytes, base64."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _completed(number: int, part: _Part) -> dict:
    entry = {"PartNumber": number, "ETag": part.etag}
    if part.crc32:
        entry["ChecksumCRC32"] = part.crc32
    return entry


def _put_multipart(
    s3, http, url: str, headers: dict[str, str], bucket: str, key: str, f: HubFile, part_size: int,
    settings: TransferSettings, pool: Executor, scan: PrefixScan, on_bytes,
) -> FileResult:
    found = _find_upload(s3, bucket, key) if key in scan.uploads else None
    if found:
        upload_id, algorithm, previous = found
    else:
        algorithm = CHECKSUM
        meta = {"hf-blob-id": f.blob_id}
        if f.sha256:
            meta["sha256"] = f.sha256
        upload_id = s3.create_multipart_upload(
            Bucket=bucket, Key=key, Metadata=meta, ChecksumAlgorithm=algorithm
        )["UploadId"]
        scan.uploads.add(key)
        previous = {}

    def part(number: int) -> tuple[bytes, _Part, int]:
        """Fetch one part and upload it unless a killed run already did; returns (bytes, part, bytes uploaded)."""
        start = (number - 1) * part_size
        data = fetch_range(http, url, headers, start, min(start + part_size, f.size) - 1, settings.reconnects)
        prev = previous.get(number)
        if prev and prev.size == len(data) and prev.etag == hashlib.md5(data).hexdigest():
            done = _Part(etag=prev.etag, size=prev.size, crc32=_crc32(data) if algorithm else None)
            sent = 0
        else:
            checksum = {"ChecksumAlgorithm": algorithm} if algorithm else {}
            resp = s3.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, **checksum
            )
            done = _Part(etag=resp["ETag"].strip('"'), size=len(data), crc32=resp.get("ChecksumCRC32") if algorithm else None)
            sent = len(data)
        on_bytes(len(data))
        return data, done, sent

    count = -(-f.size // part_size)
    sha256 = hashlib.sha256()
    parts: dict[int, _Part] = {}
    uploaded = received = 0
    window: deque[Future] = deque()  # this file's parts in the shared pool, in order
    try:
        next_part = 1
        try:
            for number in range(1, count + 1):  # hash strictly in order; keep at most `streams` parts of this file
                while next_part <= count and len(window) < settings.streams:
                    window.append(pool.submit(part, next_part))
                    next_part += 1
                data, parts[number], sent = window.popleft().result()
                sha256.update(data)
                received += len(data)
                uploaded += sent
        finally:  # on a failure: drop this file's queued parts, let its running ones finish before any abort or retry
            for fut in window:
                fut.cancel()
            wait(window)
        digest = sha256.hexdigest()
        _verify(f, received, digest, None)
    except IntegrityError:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [_completed(n, p) for n, p in sorted(parts.items())]},
    )
    if not f.sha256:  # non-LFS file big enough for multipart: record the hash we computed
        s3.copy_object(
            Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key},
            Metadata={"hf-blob-id": f.blob_id, "sha256": digest}, MetadataDirective="REPLACE",
        )
    return FileResult(path=f.path, key=key, size=f.size, sha256=digest, bytes_uploaded=uploaded)
