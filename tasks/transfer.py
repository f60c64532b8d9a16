"""Streaming one Hub file into S3: HTTP range reads feed S3 multipart uploads directly.

Bytes never land on disk. Memory per file is bounded by `parts_in_flight + 1` parts, not
the file size. The sha256 is computed in order as bytes arrive (a dropped connection is
resumed with an HTTP Range from the last byte read, so the hash never restarts), and the
multipart upload is completed only when size and hash match what the Hub advertised:
anything else is aborted, so S3 never holds a wrong object under the final key.
A multipart upload left by a killed run is picked up: parts whose MD5 matches the bytes
read are not sent again.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import httpx
from pydantic import BaseModel, Field

from tasks.errors import IntegrityError, PipelineInputError
from tasks.hub import HubFile

MiB = 1024 * 1024


class TransferSettings(BaseModel):
    """How much is in flight at once. Memory ~ files_in_flight x (parts_in_flight + 1) x part size."""

    part_size_mib: int = Field(default=16, ge=5, le=512, description="S3 multipart part size (S3's minimum is 5 MiB).")
    files_in_flight: int = Field(default=4, ge=1, le=64)
    parts_in_flight: int = Field(default=4, ge=1, le=64, description="Parts of one file uploading at once.")
    reconnects: int = Field(default=5, ge=0, le=50, description="Range-resumes of one download before the file fails.")


class FileResult(BaseModel):
    path: str
    key: str
    size: int
    sha256: str
    bytes_uploaded: int
    skipped: bool = False
    seconds: float = 0.0


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def iter_source(
    http: httpx.Client, url: str, headers: dict[str, str], size: int, reconnects: int, chunk: int = MiB
) -> Iterator[bytes]:
    """Yield the file's bytes in order; on a dropped connection, resume from the last byte with Range."""
    offset, failures = 0, 0
    while offset < size or size == 0:
        req_headers = {**headers, "Accept-Encoding": "identity"}
        if offset:
            req_headers["Range"] = f"bytes={offset}-"
        try:
            with http.stream("GET", url, headers=req_headers, follow_redirects=True) as resp:
                if resp.status_code in (401, 403, 404):
                    raise PipelineInputError(f"the Hub answered HTTP {resp.status_code} for {url}")
                resp.raise_for_status()
                if offset and resp.status_code != 206:
                    raise IntegrityError(f"the Hub ignored a Range request for {url}")
                for data in resp.iter_bytes(chunk):
                    offset += len(data)
                    yield data
            if size == 0:
                return
            if offset < size:
                raise httpx.RemoteProtocolError(f"stream ended at byte {offset} of {size}")
        except httpx.TransportError:
            failures += 1
            if failures > reconnects:
                raise
            time.sleep(min(0.2 * 2**failures, 5))
    if offset != size:
        raise IntegrityError(f"{url}: got {offset} bytes, the Hub advertised {size}")


def _parts(source: Iterator[bytes], part_size: int) -> Iterator[bytes]:
    buf = bytearray()
    for data in source:
        buf += data
        while len(buf) >= part_size:
            yield bytes(buf[:part_size])
            del buf[:part_size]
    if buf:
        yield bytes(buf)


class _Hashes:
    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)


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


def stream_file(
    s3,
    http: httpx.Client,
    url: str,
    headers: dict[str, str],
    bucket: str,
    key: str,
    f: HubFile,
    settings: TransferSettings,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> FileResult:
    started = time.monotonic()
    done_sha = existing_object_matches(s3, bucket, key, f)
    if done_sha:
        on_bytes(f.size)
        return FileResult(path=f.path, key=key, size=f.size, sha256=done_sha, bytes_uploaded=0, skipped=True)
    part_size = settings.part_size_mib * MiB
    source = iter_source(http, url, headers, f.size, settings.reconnects)
    if f.size <= part_size:
        result = _put_small(s3, bucket, key, f, source)
    else:
        result = _put_multipart(s3, bucket, key, f, source, part_size, settings.parts_in_flight, on_bytes)
    if f.size <= part_size:
        on_bytes(f.size)
    result.seconds = time.monotonic() - started
    return result


def _put_small(s3, bucket: str, key: str, f: HubFile, source: Iterator[bytes]) -> FileResult:
    data = b"".join(source)
    sha256 = hashlib.sha256(data).hexdigest()
    blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
    _verify(f, len(data), sha256, blob)
    s3.put_object(
        Bucket=bucket, Key=key, Body=data, ContentMD5=_md5_b64(data), Metadata={"sha256": sha256, "hf-blob-id": f.blob_id}
    )
    return FileResult(path=f.path, key=key, size=len(data), sha256=sha256, bytes_uploaded=len(data))


def _find_upload(s3, bucket: str, key: str) -> tuple[str, dict[int, tuple[str, int]]] | None:
    """An unfinished multipart upload for `key` and its parts {number: (etag, size)}."""
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    uploads = sorted((u for u in uploads if u["Key"] == key), key=lambda u: u["Initiated"], reverse=True)
    if not uploads:
        return None
    upload_id = uploads[0]["UploadId"]
    parts: dict[int, tuple[str, int]] = {}
    for page in s3.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id):
        for p in page.get("Parts", []):
            parts[p["PartNumber"]] = (p["ETag"].strip('"'), p["Size"])
    return upload_id, parts


def _put_multipart(
    s3, bucket: str, key: str, f: HubFile, source: Iterator[bytes], part_size: int, in_flight: int, on_bytes
) -> FileResult:
    found = _find_upload(s3, bucket, key)
    if found:
        upload_id, previous = found
    else:
        meta = {"hf-blob-id": f.blob_id}
        if f.sha256:
            meta["sha256"] = f.sha256
        upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata=meta)["UploadId"]
        previous = {}
    hashes = _Hashes()
    slots = threading.BoundedSemaphore(in_flight)
    futures: dict[int, Future] = {}
    etags: dict[int, str] = {}
    uploaded = 0

    def upload(number: int, data: bytes) -> str:
        try:
            resp = s3.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, ContentMD5=_md5_b64(data)
            )
            on_bytes(len(data))
            return resp["ETag"].strip('"')
        finally:
            slots.release()

    try:
        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="s3-part") as pool:
            for number, data in enumerate(_parts(source, part_size), start=1):
                hashes.update(data)
                prev = previous.get(number)
                if prev and prev[1] == len(data) and prev[0] == hashlib.md5(data).hexdigest():
                    etags[number] = prev[0]
                    on_bytes(len(data))
                    continue
                slots.acquire()
                for n, fut in list(futures.items()):  # surface a failed part early
                    if fut.done():
                        etags[n] = fut.result()
                        del futures[n]
                futures[number] = pool.submit(upload, number, data)
                uploaded += len(data)
            for n, fut in futures.items():
                etags[n] = fut.result()
        sha256 = hashes.sha256.hexdigest()
        _verify(f, hashes.size, sha256, None)
    except IntegrityError:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in sorted(etags.items())]},
    )
    if not f.sha256:  # non-LFS file big enough for multipart: record the hash we computed
        s3.copy_object(
            Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key},
            Metadata={"hf-blob-id": f.blob_id, "sha256": sha256}, MetadataDirective="REPLACE",
        )
    return FileResult(path=f.path, key=key, size=hashes.size, sha256=sha256, bytes_uploaded=uploaded)
