"""The artifacts are the product's pages: what a platform engineer reads in the Prefect UI instead of logs.

Fast tests (no vLLM): the markdown helper keeps hostile text in its table cell; the validation
summary keeps its checks table when the model writes blank lines (issue #26's first defect); the
pipeline summary names every step's real outcome for a failure at each step (its second defect).
`markdown_problems` is the check tests/test_ui_artifacts_e2e.py runs over the artifacts of real runs.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
from markdown_it import MarkdownIt

from tasks.core.markdown import block, code, one_line, table, text

PARSER = MarkdownIt("commonmark", {"html": True}).enable("table")  # CommonMark + GFM tables


def split_row(line: str, marked: bool = False) -> list[str]:
    """A GFM table row's cells as the parser splits them: markdown-it and cmark-gfm take a `|` after
    a backslash as escaped; marked (the Prefect UI's renderer) counts the backslashes (odd: escaped)."""
    s = line.strip()
    cells, cur, i = [], "", 0
    while i < len(s):
        ch = s[i]
        if ch == "|":
            run = len(cur) - len(cur.rstrip("\\"))
            escaped = run % 2 == 1 if marked else run >= 1
            if not escaped:
                cells.append(cur)
                cur = ""
                i += 1
                continue
        cur += ch
        i += 1
    cells.append(cur)
    if s.startswith("|"):
        cells = cells[1:]
    if s.endswith("|") and cells and cells[-1] == "":
        cells = cells[:-1]
    return [c.strip() for c in cells]


def markdown_problems(md: str, where: str = "") -> list[str]:
    """What breaks a page: a table row with another number of cells than its header (under either
    pipe rule), a line outside a table or code block that starts with `|`, raw HTML."""
    tokens = PARSER.parse(md)
    lines = md.split("\n")
    covered: set[int] = set()
    problems = []
    for t in tokens:
        if t.type in ("fence", "code_block", "table_open") and t.map:
            covered.update(range(*t.map))
        if t.type == "table_open" and t.map:
            first, end = t.map
            for marked in (False, True):
                width = len(split_row(lines[first], marked))
                for n in range(first + 2, end):
                    if lines[n].strip() and len(split_row(lines[n], marked)) != width:
                        problems.append(f"{where} line {n + 1}: {len(split_row(lines[n], marked))} cells, header {width}"
                                        f"{' (marked)' if marked else ''}: {lines[n][:160]!r}")
        if t.type == "html_block" or any(c.type == "html_inline" for c in (t.children or [])):
            problems.append(f"{where} raw HTML: {t.content[:160]!r}")
    for n, line in enumerate(lines):
        if n not in covered and line.lstrip().startswith("|"):
            problems.append(f"{where} line {n + 1} starts with | outside a table: {line[:160]!r}")
    return problems


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self._code = 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "code" and self._cell is not None:
            self._cell.append("\x00")  # marks text inside a code span

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "code" and self._cell is not None:
            self._cell.append("\x00")

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def html_tables(page: str) -> list[list[list[str]]]:
    """Every <table> of an HTML page: rows of cell texts (a code span's text between \\x00 marks)."""
    p = _Tables()
    p.feed(page)
    return p.tables


def rendered_tables(md: str) -> list[list[list[str]]]:
    return html_tables(PARSER.render(md))


HOSTILE = [
    "completion= Paris.\n\nThe answer is: 2018-01",
    "a | b || c |",
    "`tick` and ``double``",
    "<script>alert(1)</script> <b>bold</b>",
    "back\\slash \\| escaped \\\\| double",
    "trailing backslash\\",
    "*emph* _under_ [link](http://x) ![img](y) &amp; &lt;",
    "```\nfenced\n```",
    "| starts with a pipe\n| and again",
    "s3://bucket/weird key|with`ticks`/x.jsonl",
    "\r\nCRLF\rCR\u2028LS\x00\x07 control",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_text_stays_in_its_cell(value):
    md = table(["name", "text", "code", "after"], [["row 1", text(value), code(value), "end"], ["row 2", value, "x", "end"]])
    assert markdown_problems(md) == []
    (rows,) = rendered_tables(md)
    assert [len(r) for r in rows] == [4, 4, 4]
    assert rows[1][0] == "row 1" and rows[1][3] == "end" and rows[2][3] == "end"
    want = " ".join(one_line(value).split())
    assert " ".join(rows[1][1].split()) == want
    assert " ".join(rows[2][1].split()) == want  # a plain str cell is escaped too
    shown = rows[1][2]
    if "\\|" not in one_line(value):  # text, not code, for a backslash before a pipe (see tasks/core/markdown.py)
        assert shown.startswith("\x00") and shown.endswith("\x00")
    assert " ".join(shown.replace("\x00", "").split()) == want


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_text_outside_tables_and_in_blocks(value):
    md = "\n".join([f"# Title {code(value)}", "", f"- item {text(value)}", f"- code {code(value)}", "", block(value), "", "after"])
    assert markdown_problems(md) == []
    tokens = PARSER.parse(md)
    assert [t.type for t in tokens if t.type in ("heading_open", "bullet_list_open", "fence")] == \
        ["heading_open", "bullet_list_open", "fence"]
    fence = next(t for t in tokens if t.type == "fence")
    assert fence.content.rstrip("\n") == re.sub(r"\r\n|\r|\u2028", "\n", value).replace("\x00", "").replace("\x07", "")
    assert tokens[-2].content == "after"


def test_long_values_are_cut_with_an_ellipsis():
    assert text("x" * 500, limit=50) == "x" * 49 + "…"
    assert code("y" * 500, limit=10) == "`" + "y" * 9 + "…`"
    with pytest.raises(ValueError, match="cells"):
        table(["a", "b"], [["only one"]])


# ---------------------------------------------------------------- validate: the checks table

def _report(smoke_completion: str):
    from flows.validate import ValidationReport
    from tasks.validation.checks import CheckResult
    from tasks.validation.suite import CaseResult

    checks = [
        CheckResult(name="readiness", passed=True, seconds=0.0, details={"max_model_len": 2048, "metrics": {"vllm:num_requests_running": 0.0}}),
        CheckResult(name="warm-up", passed=True, seconds=3.4, details={"requests": 8, "ttft_before_ms": 119.4}),
        # what the default model answered on the demo run the issue saw
        CheckResult(name="smoke", passed=True, seconds=1.1, details={"chat": "The capital of France is Paris.",
                                                                    "completion": smoke_completion, "wrong_key_status": 401}),
        CheckResult(name="streaming", passed=True, seconds=5.1, details={"requests": 3, "ttft_ms": 94.2}),
        CheckResult(name="tool-calling", passed=False, seconds=197.9, details={"level": "semantic", "cases": 2, "passed": 0},
                    problems=["cell simple x auto: 0/1 < 100% | gated", "error `x` <b>html</b>\nsecond line"]),
        CheckResult(name="latency", passed=True, seconds=0.0, details={"ttft_p50_ms": 315.4, "samples": 25}),
    ]
    cases = [CaseResult(case="weather-two-cities", category="parallel", mode="auto", passed=False, seconds=1.0,
                        reason="the reply was cut off by max_tokens=128: 'To get the weather, use:\n\n```python\nx | y\n```'"),
             CaseResult(case="stock|pipe", category="simple", mode="auto", passed=False, reason="got <none> | `ticks`")]
    return ValidationReport(endpoint="http://127.0.0.1:8000", served_model_name="smollm2-135m-instruct", passed=False,
                            checks=checks, cases=cases, matrix={"parallel/auto": "0/1", "simple/auto": "0/1"})


def _capture(monkeypatch, module) -> dict[str, object]:
    made: dict[str, object] = {}
    monkeypatch.setattr(module, "create_markdown_artifact", lambda md, key, description=None: made.__setitem__(key, md))
    if hasattr(module, "create_table_artifact"):
        monkeypatch.setattr(module, "create_table_artifact", lambda rows, key, description=None: made.__setitem__(key, rows))
    monkeypatch.setattr(module, "get_run_logger", lambda: SimpleNamespace(info=lambda *a: None, warning=lambda *a: None,
                                                                          exception=lambda *a: None))
    return made


def test_validate_summary_keeps_its_checks_table_when_the_model_writes_a_blank_line(monkeypatch):
    """Issue #26: the smoke row's completion held a blank line; the streaming, tool-calling and latency
    rows rendered as raw `| … |` text."""
    import flows.validate as v
    from tasks.validation.suite import load_gate

    made = _capture(monkeypatch, v)
    v._artifacts(_report(" Paris.\n\nThe answer is: 2018-01"), load_gate("smollm2-135m-instruct"), "validate-t")
    md = made["validate-t"]
    assert markdown_problems(md, "validate-t") == []
    checks, matrix, failed = rendered_tables(md)
    assert [r[0] for r in checks] == ["check", "readiness", "warm-up", "smoke", "streaming", "tool-calling", "latency"]
    assert all(len(r) == 4 for r in checks)
    smoke = checks[3][3]
    assert "\x00 Paris. ⏎⏎ The answer is: 2018-01\x00" in smoke  # the model's words, in a code span
    assert "FAIL" in checks[5][1] and "error `x` <b>html</b> ⏎ second line" in checks[5][3]
    assert [r[0] for r in failed] == ["case", "\x00weather-two-cities\x00", "\x00stock|pipe\x00"]
    assert failed[2][4] == "got <none> | `ticks`"
    fences = [t for t in PARSER.parse(md) if t.type == "fence"]
    assert any(f.content == " Paris.\n\nThe answer is: 2018-01\n" for f in fences)  # the whole output, as a block


# ---------------------------------------------------------------- pipeline: every step's real outcome

STEPS = ["stage", "build", "plan", "deploy", "validate", "batch", "teardown"]
HOSTILE_REASON = "broke on `s3://b/k|x` <b>not html</b>"


def _fake_subflows(monkeypatch, fail: set[str], subflows: bool):
    """The pipeline's subflows as quick stand-ins writing their artifact key as the real ones do; a step
    in `fail` raises, its message with hostile text. `subflows`: as Prefect subflows with the real
    names (each its own run, ~1 s apiece here), else plain functions (no runs to link)."""
    from prefect import flow as prefect_flow
    from prefect.artifacts import create_markdown_artifact

    import flows.pipeline as p
    from flows.batch import BatchSummary
    from flows.build import BuildReport, BuiltImage
    from flows.stage import StagedModel
    from flows.teardown import TeardownReport
    from flows.validate import ValidationFailed, ValidationReport

    def flow(name):
        return prefect_flow(name=name) if subflows else (lambda fn: fn)

    def maybe_fail(step, exc=RuntimeError):
        if step in fail:
            raise exc(f"{step} {HOSTILE_REASON}\nsecond line of the error")

    @flow(name="stage-model")
    def stage_model(repo_id=None, **kw):
        maybe_fail("stage")
        create_markdown_artifact("# staged", key="stage-acme-tiny")
        return StagedModel(repo_id="acme/tiny", revision="main", sha="a" * 40, s3_uri="s3://b/models/acme/tiny/a/", bucket="b",
                           prefix="models/acme/tiny/a", files=3, total_bytes=10**6, bytes_uploaded=10**6, seconds=1.0,
                           already_staged=False)

    @flow(name="build-images")
    def build_images(**kw):
        maybe_fail("build")
        return BuildReport(registry="r", seconds=1.0, images=[BuiltImage(
            name="vllm", repository="r/vllm", tag="t", context_sha256="c", uri="r/vllm:t", image_ref="r/vllm@sha256:d",
            digest="sha256:d", size_bytes=1, built=True, builder="buildah", build_seconds=1, push_seconds=1, variable="v")])

    @flow(name="plan-capacity")
    def plan_capacity(**kw):
        create_markdown_artifact("# plan", key="capacity-plan-acme-tiny")
        maybe_fail("plan")
        return SimpleNamespace(chosen=SimpleNamespace(instance_type="g4dn.xlarge", tensor_parallel_size=1, price_per_hour=0.526))

    @flow(name="deploy-model")
    def deploy_model(stack, **kw):
        maybe_fail("deploy")
        create_markdown_artifact("# deployed", key=f"deploy-{stack}")
        return SimpleNamespace(endpoint=SimpleNamespace(url="http://127.0.0.1:9", served_model_name="m"), gateway=None)

    @flow(name="validate")
    def validate(stack, **kw):
        create_markdown_artifact("# validation", key=f"validate-{stack}")  # written before the gate fails, as the real one
        maybe_fail("validate", ValidationFailed)
        return ValidationReport(endpoint="http://127.0.0.1:9", served_model_name="m", passed=True, checks=[], cases=[], matrix={})

    @flow(name="batch-inference")
    def batch_inference(input_uri, stack, **kw):
        maybe_fail("batch")
        create_markdown_artifact("# batch", key=f"batch-{stack}")
        return [BatchSummary(input_uri=input_uri, output_uri="s3://b/out/output.jsonl", errors_uri="s3://b/out/errors.jsonl",
                             lines=4, ok=4, failed=0, resumed_lines=0, prompt_tokens=1, completion_tokens=1, wall_s=1,
                             requests_per_s=4, output_tokens_per_s=4, latency_p50_s=None, latency_p95_s=None, retries=0,
                             estimated_cost_usd=0, price_per_hour=0)]

    @flow(name="teardown")
    def teardown_stack(stack, **kw):
        maybe_fail("teardown")
        create_markdown_artifact("# torn down", key=f"teardown-{stack}")
        return TeardownReport(stack=stack, had_state_record=True, deleted=["process 1"], left=[])

    for name, fn in dict(stage_model=stage_model, build_images=build_images, plan_capacity=plan_capacity,
                         deploy_model=deploy_model, validate=validate, batch_inference=batch_inference,
                         teardown_stack=teardown_stack).items():
        monkeypatch.setattr(p, name, fn)


def _summary_rows(md: str) -> dict[str, list[str]]:
    (rows,) = rendered_tables(md)
    assert rows[0] == ["step", "outcome", "artifact", "run", "details"]
    assert [r[0] for r in rows[1:]] == STEPS
    return {r[0]: r for r in rows[1:]}


SUBFLOWS = {"validate"}  # the cases run with real subflow runs (links to runs and artifacts checked)
CASES = {  # name: (failing steps, keep_failed, expected outcome per step)
    "success": (set(), False, dict.fromkeys(STEPS, "done")),
    "stage": ({"stage"}, False, {"stage": "FAILED", **dict.fromkeys(STEPS[1:6], "not reached"), "teardown": "skipped"}),
    "build": ({"build"}, False, {"stage": "done", "build": "FAILED", **dict.fromkeys(STEPS[2:6], "not reached"),
                                 "teardown": "skipped"}),
    "plan": ({"plan"}, False, {"stage": "done", "build": "done", "plan": "FAILED", **dict.fromkeys(STEPS[3:6], "not reached"),
                               "teardown": "skipped"}),
    "deploy": ({"deploy"}, False, {**dict.fromkeys(STEPS[:3], "done"), "deploy": "FAILED", "validate": "not reached",
                                   "batch": "not reached", "teardown": "done"}),
    "validate": ({"validate"}, False, {**dict.fromkeys(STEPS[:4], "done"), "validate": "FAILED", "batch": "not reached",
                                       "teardown": "done"}),
    "batch": ({"batch"}, True, {**dict.fromkeys(STEPS[:5], "done"), "batch": "FAILED", "teardown": "skipped"}),
    "teardown": ({"teardown"}, False, {**dict.fromkeys(STEPS[:6], "done"), "teardown": "FAILED"}),
    "validate-and-teardown": ({"validate", "teardown"}, False, {**dict.fromkeys(STEPS[:4], "done"), "validate": "FAILED",
                                                                 "batch": "not reached", "teardown": "FAILED"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_summary_names_every_steps_real_outcome(monkeypatch, case):
    """Issue #26: a run that failed at validate said `validate | not run`, and no failed step's reason
    was on the page. Now: done / skipped / FAILED with its reason / not reached, for a failure at each step."""
    from prefect.artifacts import create_markdown_artifact

    import flows.pipeline as p

    fail, keep_failed, expected = CASES[case]
    _fake_subflows(monkeypatch, fail, case in SUBFLOWS)
    made = {}

    def capture(md, key, description=None):
        made[key] = md
        return create_markdown_artifact(md, key=key, description=description)

    monkeypatch.setattr(p, "create_markdown_artifact", capture)
    stack = f"art-{case}"
    kwargs = dict(stack=stack, repo_id="acme/tiny", build=True, batch_input_uri="s3://b/in.jsonl", keep_failed=keep_failed)
    if fail:
        first = next(s for s in STEPS if s in fail)
        with pytest.raises(Exception, match=f"^{first} broke"):  # the first failure is what the run raises
            p.pipeline(**kwargs)
    else:
        result = p.pipeline(**kwargs)
    md = made[f"pipeline-{stack}"]
    assert markdown_problems(md, case) == []
    by_step = {r[0]: " ".join(r[1:]) for t in rendered_tables(md) for r in t[1:]}
    for step in fail:  # the page says it failed, and why
        assert "FAILED" in by_step[step] and f"{step} {HOSTILE_REASON}" in by_step[step], by_step[step]
        assert "not run" not in by_step[step]
    if not fail:
        assert [(s.step, s.outcome) for s in result.steps] == [(s, "done") for s in STEPS]
    rows = _summary_rows(md)
    assert {s: rows[s][1] for s in STEPS} == expected
    for step in STEPS:
        if expected[step] == "FAILED":
            assert rows[step][4].endswith(f"{step} {HOSTILE_REASON}"), rows[step]  # the reason, its first line, escaped
        if expected[step] in ("done", "FAILED") and case in SUBFLOWS:
            assert rows[step][3] == "run"  # a link to the step's own subflow run
    for step, key in {"stage": "stage-acme-tiny", "plan": "capacity-plan-acme-tiny", "deploy": f"deploy-{stack}",
                      "validate": f"validate-{stack}", "batch": f"batch-{stack}", "teardown": f"teardown-{stack}"}.items():
        if case in SUBFLOWS and (expected[step] == "done" or (step in ("validate", "plan") and expected[step] == "FAILED")):
            assert rows[step][2].strip("\x00") == key, (step, rows[step])  # this run's own artifact
    if "validate" in fail:
        assert "not run" not in rows["validate"][4]
    head = md.split("\n")
    assert head[0] == f"# Pipeline for stack `{stack}`: " + ("FAILED" if fail else "completed")
    if fail:
        assert f"**FAILED** at {first}:" in md
    if case == "batch":  # kept for debugging: said so
        assert "keep_failed" in rows["teardown"][4]
