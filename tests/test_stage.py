"""The stage flow against the local hub server and the moto server (issue: stage)."""

from __future__ import annotations

import pytest

from blocks.model_source import ModelSource
from blocks.model_store import ModelStore
from embedded.hub_server import HubRepo
from flows.stage import stage_model
from tasks.core.aws import aws_client
from tasks.core.errors import PipelineInputError
from tasks.core.s3 import read_manifest
from tasks.stage.transfer import TransferSettings

pytestmark = pytest.mark.integration

SMALL_PARTS = TransferSettings(part_size_mib=5, files_in_flight=3, parts_in_flight=3)


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = aws_client("s3")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _run(bucket: str, **kw):
    from blocks.model_store import ModelStore

    store = ModelStore(bucket_name=bucket)
    from flows.stage import stage

    source = ModelSource(repo_id=kw.pop("repo_id", "acme/tiny"), revision=kw.pop("revision", "main"), token=kw.pop("token", None))

    @__import__("prefect").flow
    def run():
        return stage(source, store, kw.pop("transfer", SMALL_PARTS))

    return run()


def test_stages_byte_identical_with_manifest(hub, bucket, tiny_model):
    result = _run(bucket)
    repo = HubRepo(tiny_model)
    assert result.sha == repo.sha and not result.already_staged
    objects = _objects(bucket, result.prefix)
    expected = {p for p in repo.files if not p.endswith((".bin", ".pth"))}
    assert set(objects) - {"_manifest.json"} == expected
    for path in expected:
        assert objects[path] == (tiny_model / path).read_bytes(), path
    manifest = read_manifest(aws_client("s3"), bucket, result.prefix)
    assert {f.path: f.sha256 for f in manifest.files} == {p: repo.files[p].sha256 for p in expected}
    assert result.bytes_uploaded == sum(repo.files[p].size for p in expected)
    # The multipart objects carry S3's CRC32 (per part and composite), as boto3's upload_file leaves them.
    head = aws_client("s3").head_object(Bucket=bucket, Key=f"{result.prefix}/{BIG}", ChecksumMode="ENABLED")
    assert head["ContentLength"] > SMALL_PARTS.part_size_mib * 1024 * 1024 and head.get("ChecksumCRC32")


def test_second_run_transfers_nothing(hub, bucket):
    first = _run(bucket)
    downloads_before = [r for r in hub.requests if "/resolve/" in r[1]]
    second = _run(bucket)
    downloads_after = [r for r in hub.requests if "/resolve/" in r[1]]
    assert second.already_staged and second.bytes_uploaded == 0
    assert downloads_after == downloads_before  # not one file byte fetched
    assert second.sha == first.sha


BIG = "model-00001-of-00002.safetensors"


def _no_objects_or_uploads(bucket: str) -> None:
    s3 = aws_client("s3")
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_connection_dropped_mid_file_is_resumed(hub, bucket, tiny_model):
    hub.inject("drop_mid_file", BIG)
    result = _run(bucket)
    assert _objects(bucket, result.prefix)[BIG] == (tiny_model / BIG).read_bytes()
    gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith(BIG)]
    parts = -(-(tiny_model / BIG).stat().st_size // (5 * 1024 * 1024))
    assert len(gets) == parts + 1  # one part's GET dropped half-way and was fetched again, nothing else


def test_killed_run_resumes_without_resending_parts(hub, bucket, tiny_model):
    # The connection drops half-way through every try (no Range reconnects allowed), so
    # the run fails leaving an unfinished multipart upload behind, as a killed process would.
    hub.inject("drop_mid_file", BIG, times=10)
    with pytest.raises(Exception):
        _run(bucket, transfer=TransferSettings(part_size_mib=5, reconnects=0, files_in_flight=1))
    s3 = aws_client("s3")
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert any(u["Key"].endswith(BIG) for u in uploads)
    assert not any(k.endswith("_manifest.json") for k in _objects(bucket, "models"))
    result = _run(bucket)
    size = (tiny_model / BIG).stat().st_size
    assert _objects(bucket, result.prefix)[BIG] == (tiny_model / BIG).read_bytes()
    assert result.bytes_uploaded <= result.total_bytes - 2 * 5 * 1024 * 1024  # the 2 parts done were not sent again
    assert size > 4 * 5 * 1024 * 1024


def _count_s3_calls(monkeypatch, *operations: str) -> dict[str, int]:
    """Count the stage tasks' S3 calls of these operations (every client they make)."""
    import tasks.stage.staging

    counts = dict.fromkeys(operations, 0)

    def counting_client(store):
        s3 = aws_client("s3", store.credentials)
        for op in operations:
            s3.meta.events.register(f"before-call.s3.{op}", lambda op=op, **_: counts.__setitem__(op, counts[op] + 1))
        return s3

    monkeypatch.setattr(tasks.stage.staging, "s3_client", counting_client)
    return counts


def test_a_fresh_stage_lists_the_prefix_once_instead_of_asking_per_file(hub, bucket, monkeypatch):
    calls = _count_s3_calls(monkeypatch, "HeadObject", "ListMultipartUploads", "ListObjectsV2")
    result = _run(bucket)
    assert result.files >= 5 and not result.already_staged
    assert calls == {"HeadObject": 0, "ListMultipartUploads": 1, "ListObjectsV2": 1}


def test_a_retried_file_resumes_the_upload_its_first_try_began(hub, bucket, tiny_model):
    # No Range reconnects: the first try of BIG fails half-way (its first parts uploaded) and
    # Prefect retries the task. The retry must find that upload (the run's scan knows it now)
    # and resume it, not begin a second one and leave the first behind.
    hub.inject("drop_mid_file", BIG)
    result = _run(bucket, transfer=TransferSettings(part_size_mib=5, reconnects=0, files_in_flight=1, parts_in_flight=1))
    assert _objects(bucket, result.prefix)[BIG] == (tiny_model / BIG).read_bytes()
    assert result.bytes_uploaded <= result.total_bytes - 2 * 5 * 1024 * 1024  # the parts before the drop: not sent again
    assert not aws_client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_upload_left_without_a_checksum_is_finished_as_begun(hub, bucket, tiny_model):
    # An upload begun without a checksum algorithm (as an earlier version of the stage flow did)
    # is completed without part checksums, and its finished parts are not sent again.
    from tasks.core.s3 import model_prefix

    part = 5 * 1024 * 1024
    data = (tiny_model / BIG).read_bytes()
    key = f"{model_prefix(ModelStore(bucket_name=bucket), 'acme/tiny', HubRepo(tiny_model).sha)}/{BIG}"
    s3 = aws_client("s3")
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    for number in (1, 2):
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=data[(number - 1) * part:number * part])
    assert "ChecksumAlgorithm" not in s3.list_multipart_uploads(Bucket=bucket)["Uploads"][0]
    result = _run(bucket)
    assert _objects(bucket, result.prefix)[BIG] == data
    assert result.bytes_uploaded == result.total_bytes - 2 * part
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_a_file_alone_gets_every_worker_of_the_shared_part_pool(hub, bucket):
    # The run's files share files_in_flight x parts_in_flight part workers: one big file keeps all
    # of them busy (parts_in_flight alone would leave half idle). Each part waits until that many
    # are in flight, so a smaller window times out instead of passing by luck.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tasks.stage.hub import file_url, resolve_revision
    from tasks.stage.transfer import PrefixScan, http_pool, stream_file

    settings = TransferSettings(part_size_mib=5, files_in_flight=2, parts_in_flight=2)

    class GatedPool(ThreadPoolExecutor):
        def __init__(self, need: int):
            super().__init__(max_workers=need)
            self.need, self.submitted, self.all_in = need, 0, threading.Event()

        def submit(self, fn, *args, **kwargs):
            self.submitted += 1
            if self.submitted >= self.need:
                self.all_in.set()

            def gated():
                assert self.all_in.wait(10), f"only {self.submitted} parts in flight, want {self.need}"
                return fn(*args, **kwargs)

            return super().submit(gated)

    snapshot = resolve_revision.fn(ModelSource(repo_id="acme/tiny"))
    f = next(f for f in snapshot.files if f.path == BIG)
    assert f.size > settings.streams * 5 * 1024 * 1024
    with GatedPool(settings.streams) as pool, http_pool(settings.streams) as http:
        result = stream_file(
            aws_client("s3"), http, file_url(snapshot, BIG), {}, bucket, f"m/{BIG}", f, settings, pool, PrefixScan()
        )
    assert result.sha256 == f.sha256 and pool.submitted == -(-f.size // (5 * 1024 * 1024))


def test_corrupt_hub_bytes_are_never_accepted(hub, bucket):
    hub.inject("corrupt", BIG, times=-1)
    with pytest.raises(Exception, match="sha256"):
        _run(bucket)
    s3 = aws_client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not any(k.endswith(BIG) or k.endswith("_manifest.json") for k in keys)
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_transient_5xx_is_retried(hub, bucket, tiny_model):
    hub.inject("error_5xx", "config.json")
    result = _run(bucket)
    assert _objects(bucket, result.prefix)["config.json"] == (tiny_model / "config.json").read_bytes()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"repo_id": "acme/missing"}, "Hub repo 'acme/missing' not found"),
        ({"revision": "no-such-branch"}, "revision 'no-such-branch' not found in Hub repo 'acme/tiny'"),
    ],
)
def test_unknown_repo_or_revision_is_a_clear_error(hub, bucket, kw, message):
    with pytest.raises(PipelineInputError, match=message):
        _run(bucket, **kw)
    _no_objects_or_uploads(bucket)
    assert not any("/resolve/" in r[1] for r in hub.requests)


def test_gated_repo_needs_the_right_token(tiny_model, bucket, monkeypatch):
    from embedded.hub_server import LocalHub

    with LocalHub({"acme/gated": HubRepo(tiny_model, token="hf_right")}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        with pytest.raises(PipelineInputError, match="'acme/gated' is gated or private"):
            _run(bucket, repo_id="acme/gated")
        with pytest.raises(PipelineInputError, match="'acme/gated'"):
            _run(bucket, repo_id="acme/gated", token="hf_wrong")
        _no_objects_or_uploads(bucket)
        result = _run(bucket, repo_id="acme/gated", token="hf_right")
        assert result.files > 0


def test_missing_bucket_fails_before_any_transfer(hub):
    with pytest.raises(PipelineInputError, match="S3 bucket 'no-such-bucket-here' does not exist"):
        _run("no-such-bucket-here")
    assert hub.requests == []


def test_flow_parameters_are_validated_first(hub, local_aws):
    with pytest.raises(PipelineInputError, match=r"ModelSource.repo_id: .*not a Hugging Face repo id"):
        stage_model(repo_id="../../etc/passwd")
    assert hub.requests == []


def test_default_patterns_skip_legacy_weights():
    from tasks.stage.hub import select_files

    paths = ["config.json", "model.safetensors", "pytorch_model.bin", "original/consolidated.pth", "tokenizer.json", "README.md"]
    source = ModelSource()
    assert select_files(paths, source.allow_patterns, source.ignore_patterns) == ["config.json", "model.safetensors", "tokenizer.json"]
    # Without safetensors, a user who allows *.bin gets them.
    assert select_files(["config.json", "pytorch_model.bin"], ["*.json", "*.bin"], []) == ["config.json", "pytorch_model.bin"]
