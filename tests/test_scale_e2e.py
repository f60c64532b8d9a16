"""Scale to zero and idle by traffic on the local target, with real vLLM servers and real requests.

Two stacks start side by side (one start's time: vLLM's start is mostly one core's work): "busy"
gets requests, "quiet" none; reap, with a TTL of seconds, tears down quiet and spares busy. Busy
is scaled to zero (its process gone, its last request kept), the scheduled batch's flow wakes it,
runs on it and puts it back to zero, with what the wake cost in its summary; reap spares it at
zero until its own idle limit passes. The default model (its answers are checked): a servable tiny
random model starts no faster (measured ~26 s both on 2 cores; vLLM's start, not the weights).
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from tasks.core.aws import Aws, aws_client
from tasks.core.secrets import read_secret
from tasks.core.state import load_state, load_traffic
from tasks.targets.local.runtime import is_our_server
from tasks.teardown.sweep import leftovers

pytestmark = pytest.mark.e2e

BUSY, QUIET = "e2e-scale-busy", "e2e-scale-quiet"
TTL_S = 3
SETTINGS = VllmServerSettings(enforce_eager=True, max_model_len=1024, max_num_seqs=8, cpu_kv_cache_gib=1)
QUESTION = {"model": SETTINGS.served_model_name, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture(scope="module")
def store(local_aws):
    """A bucket of its own for the state records: reap judges every stack in its store."""
    name = f"scale-e2e-{os.urandom(3).hex()}"
    aws_client("s3").create_bucket(Bucket=name)
    store = ModelStore(bucket_name=name)
    store.save("scale-e2e-store", overwrite=True)
    return store


@pytest.fixture(scope="module")
def model(staged_default):
    """The default model, staged once per session (tests/conftest.py)."""
    return staged_default


def _ask(state) -> str:
    key = read_secret(state.endpoint.api_key_secret).get_secret_value()
    resp = httpx.post(f"{state.endpoint.url}/v1/chat/completions", json=QUESTION, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def _wait_idle_past(store, stack: str, seconds: float) -> None:
    """Until `seconds` have passed since the stack's last request, deploy or wake (whichever is later)."""
    state = load_state(store, stack)[0]
    marks = [datetime.fromisoformat(t) for t in (state.scale.active_at, load_traffic(store, stack)[0].last_request_at) if t]
    time.sleep(max(0.0, (max(marks) + timedelta(seconds=seconds + 1) - datetime.now(timezone.utc)).total_seconds()))


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(arts, key=lambda a: a.created).data


def _wake_row(page: str) -> dict[str, str]:
    """The batch summary's "woken from zero" table as {column: value}."""
    rows = [line for line in page.split("## Woken from zero", 1)[1].splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in (rows[0], rows[2])]
    return dict(zip(*cells))


def test_reap_by_traffic_scale_to_zero_and_the_batch_waking_it(store, model):
    from prefect import flow

    from flows.batch import batch_inference
    from flows.deploy import deploy
    from flows.operations import reap_stacks, stack_statuses
    from flows.scale import scale
    from flows.teardown import teardown

    ttl_hours = TTL_S / 3600
    errors: list[BaseException] = []

    def up(stack: str) -> None:
        try:
            flow(name=f"deploy-{stack}")(lambda: deploy(stack, store, SETTINGS, model, ready_timeout_s=600,
                                                         ttl_hours=ttl_hours))()
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=up, args=(s,)) for s in (BUSY, QUIET)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        deployed_s = time.monotonic() - started
        busy = load_state(store, BUSY)[0]
        quiet_pid = load_state(store, QUIET)[0].endpoint.pid

        # -- idle by traffic: three real requests to busy, none to quiet; TTL 3 s
        assert all("Paris" in _ask(busy) for _ in range(3))
        _wait_idle_past(store, QUIET, TTL_S)
        verdicts = {v.stack: v for v in flow(name="t-reap")(reap_stacks)(store)}
        assert verdicts[QUIET].expired and "since its deploy or scale up" in verdicts[QUIET].why
        assert not verdicts[BUSY].expired and "since its last request" in verdicts[BUSY].why, verdicts[BUSY].why
        assert load_state(store, QUIET)[0] is None and not is_our_server(quiet_pid)
        assert leftovers(Aws(), QUIET) == []
        [row] = flow(name="t-status")(stack_statuses)(store)
        assert (row.stack, row.replicas, row.requests_last_hour) == (BUSY, 1, 3) and row.last_request_at

        # -- scale to zero: the process is gone, the record says so and keeps the last request
        report = scale(stack=BUSY, replicas=0, model_store_block="scale-e2e-store")
        asleep = load_state(store, BUSY)[0]
        assert (report.before, report.after) == (1, 0) and not is_our_server(busy.endpoint.pid)
        assert asleep.at_zero and asleep.endpoint.pid is None
        assert load_traffic(store, BUSY)[0].last_request_at == row.last_request_at  # its requests outlive the process
        assert not [r for r in asleep.resources if r.kind == "process"]

        # -- the batch wakes it, runs, puts it back to zero; the summary says what the wake cost
        lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": QUESTION} for i in range(4)]
        aws_client("s3").put_object(Bucket=store.bucket_name, Key="jobs/in/capitals.jsonl",
                                    Body="\n".join(json.dumps(x) for x in lines).encode())
        woke = time.monotonic()
        [summary] = batch_inference(input_uri=f"s3://{store.bucket_name}/jobs/in/capitals.jsonl", stack=BUSY,
                                    model_store_block="scale-e2e-store", concurrency=4)
        wake_s = time.monotonic() - woke
        assert summary.ok == 4 and summary.failed == 0
        body = aws_client("s3").get_object(Bucket=store.bucket_name, Key="jobs/in-results/capitals/output.jsonl")["Body"].read()
        answers = [json.loads(x)["response"]["body"]["choices"][0]["message"]["content"] for x in body.splitlines()]
        assert len(answers) == 4 and all("Paris" in a for a in answers), answers
        after = load_state(store, BUSY)[0]
        assert after.at_zero and after.scale.by == "batch" and after.endpoint.pid is None
        assert after.endpoint.url == busy.endpoint.url  # woken on its old port: the same URL
        assert load_traffic(store, BUSY)[0].last_request_at > row.last_request_at  # the batch's requests, seen before the stop
        [wake_note] = [h for h in after.history if "0 -> 1 (batch): server pid" in h]
        assert not is_our_server(int(wake_note.split("server pid ")[1].split()[0]))
        wake = _wake_row(_artifact(f"batch-{BUSY}"))
        awake = float(wake["awake"].removesuffix(" s"))
        assert 5 < awake <= wake_s and wake["GPUs each"] == "0" and wake["GPU-hours"] == "0.0", wake
        assert float(wake["instance-hours"]) == pytest.approx(awake / 3600, abs=1e-4)

        # -- at zero by design: idle past its TTL, but spared until its own limit passes
        _wait_idle_past(store, BUSY, TTL_S)
        [v] = flow(name="t-reap")(reap_stacks)(store)
        assert v.at_zero and not v.expired and v.limit_hours == 168
        scale(stack=BUSY, replicas=0, zero_ttl_hours=ttl_hours, model_store_block="scale-e2e-store")
        _wait_idle_past(store, BUSY, TTL_S)
        [v] = flow(name="t-reap")(reap_stacks)(store)
        assert v.expired and load_state(store, BUSY)[0] is None and leftovers(Aws(), BUSY) == []
        print(f"deploy of both stacks {deployed_s:.0f} s; batch with its wake {wake_s:.0f} s (awake {awake:.0f} s)")
    finally:
        for t in threads:
            t.join()
        for s in (BUSY, QUIET):
            if load_state(store, s)[0] is not None:
                flow(name=f"teardown-{s}")(lambda: teardown(s, store))()
