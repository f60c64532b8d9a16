"""validate: readiness, warm-up, smoke, streaming, the tool-calling suite and latency against an endpoint.

Fails the run (not just logs) when a required check fails, naming what failed.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, NonNegativeInt

from blocks.loading import load_config
from blocks.model_store import ModelStore
from tasks.core.endpoint import Endpoint, EndpointError
from tasks.core.errors import PipelineInputError, flow
from tasks.core.markdown import Md, block, bold, code, table, text
from tasks.core.naming import check_stack_name
from tasks.core.s3 import s3_client
from tasks.core.secrets import read_secret
from tasks.core.state import require_state
from tasks.validation.bfcl import load_bfcl_suite
from tasks.validation.checker import Level
from tasks.validation.checks import (
    CheckResult,
    LatencyThresholds,
    Samples,
    check_readiness,
    latency_summary,
    smoke,
    streaming,
    tool_suite,
    warm_up,
)
from tasks.validation.gateway import gateway_checks, gateway_target
from tasks.validation.suite import (
    CATEGORIES, SUITE_CONCURRENCY, CaseResult, Mode, SuiteConcurrency, has_own_gate, load_gate, load_suite, matrix,
)


class ValidationFailed(RuntimeError):
    """A required check failed; the message names every failed check and case."""


class ValidationReport(BaseModel):
    endpoint: str
    served_model_name: str
    passed: bool
    checks: list[CheckResult]
    cases: list[CaseResult]
    matrix: dict[str, str]  # "category/mode" -> "passed/total"
    retries: int = 0  # transient endpoint failures (429/502/503/504, resets) retried during the run
    adapters: list["ValidationReport"] = []  # a stack's LoRA adapters, each validated under its served name


def validate_endpoint(
    url: str, api_key: str, served_model_name: str, *, max_model_len: int | None = None, level: str | None = None,
    gate: str | dict | None = None, extra_cases: dict | None = None, thresholds: LatencyThresholds = LatencyThresholds(),
    warmup_requests: int = 8, artifact_key: str = "validate", raise_on_failure: bool = True, modes: list[str] | None = None,
    bfcl_suite: dict | None = None, suite_concurrency: int = SUITE_CONCURRENCY, extra_checks: list[CheckResult] | None = None,
) -> ValidationReport:
    logger = get_run_logger()
    suite = load_suite(extra_cases, modes, bfcl_suite)  # bad user cases fail here, before any request
    gate_profile = load_gate(served_model_name, gate)
    if level:
        gate_profile = gate_profile.model_copy(update={"level": level})
    checks: list[CheckResult] = []
    samples = Samples()
    with Endpoint(url, api_key, served_model_name) as ep:
        try:
            checks.append(check_readiness(ep, max_model_len))
            if not checks[0].passed:
                raise ValidationFailed(f"endpoint {url} is not ready: {'; '.join(checks[0].problems)}")
            warm, s = warm_up(ep, warmup_requests)
            checks.append(warm)
            samples.extend(s)
            checks.append(smoke(ep))
            stream_check, s = streaming(ep)
            checks.append(stream_check)
            samples.extend(s)
            tools_check, cases, s = tool_suite(ep, suite, gate_profile, suite_concurrency)
            checks.append(tools_check)
            samples.extend(s)
            checks.append(latency_summary(samples, thresholds))
            checks += extra_checks or []  # the stack's tool gateway's (tasks/validation/gateway.py)
        except EndpointError as exc:
            raise ValidationFailed(f"endpoint {url} stopped answering during validation "
                                   f"({ep.retries} transient failures retried): {exc}") from None
        retries = ep.retries
    cells = {f"{c}/{m}": f"{p}/{t}" for (c, m), (p, t) in sorted(matrix(cases).items())}
    report = ValidationReport(endpoint=url, served_model_name=served_model_name, passed=all(c.passed for c in checks),
                              checks=checks, cases=cases, matrix=cells, retries=retries)
    _artifacts(report, gate_profile, artifact_key)
    if not report.passed and raise_on_failure:
        failed = [f"{c.name} ({'; '.join(c.problems)})" for c in checks if not c.passed]
        raise ValidationFailed("validation failed: " + " | ".join(failed))
    logger.info("validation of %r %s: %d checks, %d/%d tool cases", served_model_name,
                "passed" if report.passed else "FAILED", len(checks), sum(c.passed for c in cases), len(cases))
    return report


def _name_key(key: str, name: str) -> str:
    return f"{key}-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _comparison(reports: list[ValidationReport], key: str) -> None:
    """Base and adapters side by side: each name's pass count per category x tool_choice."""
    cells = sorted({cell for r in reports for cell in r.matrix}, key=lambda c: (CATEGORIES.index(c.split("/")[0])
                                                                                 if c.split("/")[0] in CATEGORIES else 99, c))
    create_table_artifact([{"cell": cell, **{r.served_model_name: r.matrix.get(cell, "–") for r in reports}} for cell in cells],
                          key=f"{key}-by-model", description="Tool-calling pass counts by served model")


MODEL_TEXT = ("chat", "completion")  # details of the smoke check that are the model's own words
DETAIL_LIMIT = 300  # characters of a check's details in the summary table; the log has them in full


def _detail(c: CheckResult) -> Md:
    """A check's details for a table cell: problems as escaped text, model outputs and strings as
    code, numbers as they are; cut to DETAIL_LIMIT (the full text is logged)."""
    if c.problems:
        return text("; ".join(c.problems), limit=DETAIL_LIMIT)
    parts = []
    for k, v in c.details.items():
        if k == "models":
            continue
        if isinstance(v, dict):
            parts.append(text(f"{k}: " + ", ".join(f"{n}={x}" for n, x in v.items()), limit=160))
        elif isinstance(v, str):
            parts.append(Md(f"{text(k)}={code(v, limit=80)}"))
        else:
            parts.append(text(f"{k}={v}"))
    out = Md(", ".join(parts))
    return out if len(out) <= DETAIL_LIMIT * 2 else text(", ".join(f"{k}={v}" for k, v in c.details.items()), limit=DETAIL_LIMIT)


def _artifacts(report: ValidationReport, gate, key: str) -> None:
    logger = get_run_logger()
    create_table_artifact(
        [{"case": c.case, "category": c.category, "tool_choice": c.mode, "result": "pass" if c.passed else "FAIL",
          "gated": "yes" if gate.requires(c.category, c.mode) else "no", "latency_s": round(c.seconds, 2), "reason": c.reason}
         for c in report.cases],
        key=f"{key}-cases", description=f"Tool-calling cases ({gate.level})",
    )
    for c in report.checks:  # the table cuts long details; here they are whole
        full = "; ".join(c.problems) if c.problems else ", ".join(f"{k}={v!r}" for k, v in c.details.items() if k != "models")
        if len(full) > DETAIL_LIMIT or c.problems:
            logger.info("check %s %s: %s", c.name, "passed" if c.passed else "FAILED", full)
    modes = ["auto", "required", "named", "none"]
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [f"# Validation of {code(report.served_model_name)} at {code(report.endpoint)}: {verdict}", ""]
    failed_checks = [c for c in report.checks if not c.passed]
    if failed_checks:
        lines += [Md("**Failed:** " + "; ".join(f"{text(c.name)} ({text('; '.join(c.problems), limit=200)})"
                                                 for c in failed_checks)), ""]
    lines += [f"Transient endpoint failures retried (429/502/503/504, resets): {report.retries}", "",
              table(["check", "result", "seconds", "details"],
                    [[c.name, Md("pass") if c.passed else bold("FAIL"), f"{c.seconds:.1f}", _detail(c)] for c in report.checks],
                    align="llrl")]
    lines += ["", f"## Tool calling ({text(gate.level)}): pass rate by category × tool_choice (\\* = gated)", ""]
    rows = []
    for cat in CATEGORIES:
        row = [cat]
        for m in modes:
            cell = report.matrix.get(f"{cat}/{m}")
            row.append(Md("–") if cell is None else Md(text(cell) + ("\\*" if gate.requires(cat, m) else "")))
        rows.append(row)
    lines.append(table(["category", *modes], rows))
    outputs = [c for c in report.checks if c.name == "smoke" and any(c.details.get(k) for k in MODEL_TEXT)]
    if outputs:
        lines += ["", "## Model outputs (smoke check)", ""]
        for k in MODEL_TEXT:
            if outputs[0].details.get(k):
                lines += [f"{k}:", "", block(outputs[0].details[k], limit=2000), ""]
    failed = [c for c in report.cases if not c.passed]
    if failed:
        lines += ["", f"## Failed cases ({len(failed)}; every case with its whole reason: table artifact {code(key + '-cases')})", "",
                  table(["case", "category", "tool_choice", "gated", "reason"],
                        [[code(c.case), c.category, c.mode, "yes" if gate.requires(c.category, c.mode) else "no",
                          text(c.reason, limit=DETAIL_LIMIT)] for c in failed])]
    create_markdown_artifact("\n".join(lines), key=key, description="Validation summary")


def _gateway_checks(state, store: ModelStore, region: str | None) -> list[CheckResult]:
    """The stack's tool gateway's checks, run before the model's suites; reported with the first served name's."""
    if state.gateway is None:
        return []
    target = gateway_target(state.gateway.url, state.gateway.tenants_secret, store, region)
    if target is None:
        get_run_logger().warning("stack %r: its gateway was deployed without validate's check tenants (checks=False): "
                                 "gateway checks skipped", state.stack)
        return []
    return gateway_checks(target)


@flow(name="validate", log_prints=True)
def validate(
    stack: str | None = None,
    endpoint_url: str | None = None,
    api_key_secret: str | None = None,
    served_model_name: str | None = None,
    level: Level | None = None,
    gate: str | None = None,
    gates: dict[str, str] | None = None,
    served_model_names: list[str] | None = None,
    modes: list[Mode] | None = None,
    extra_cases: dict | None = None,
    bfcl_suite: dict | None = None,
    thresholds: LatencyThresholds = LatencyThresholds(),
    warmup_requests: NonNegativeInt = 8,
    suite_concurrency: SuiteConcurrency = SUITE_CONCURRENCY,
    model_store_block: str | None = None,
) -> ValidationReport:
    """Validate stack `stack` (its endpoint from the state record) or an explicit endpoint
    (`endpoint_url`, `served_model_name`, and `api_key_secret`: a Secrets Manager id, never the key).
    A stack is validated under each served name: the base model and every LoRA adapter
    (`served_model_names` picks some), each with its gate profile (`gates`: name -> profile;
    default the profile named after the served name; an adapter without one gets its base
    model's; else default.yaml; `gate` is the base model's). `suite_concurrency`: tool-calling cases in
    flight at once (4; 1 runs them one at a time). `modes` runs only those tool_choice
    modes of the suite (["auto"]: a quick run of what each model decides by itself). `bfcl_suite`
    runs a BFCL-format data set instead of the repo's cases (docs/validation-bfcl.md): e.g.
    {"questions": "s3://b/BFCL_v4_simple_python.json", "answers": "s3://b/possible_answer/BFCL_v4_simple_python.json"}.
    A stack with a tool gateway gets its checks too (tasks/validation/gateway.py), reported with the first
    served name's checks."""
    bfcl = load_bfcl_suite(bfcl_suite, s3=lambda: s3_client(load_config(ModelStore, model_store_block))) if bfcl_suite else None
    max_len, adapters, region = None, [], None
    store = load_config(ModelStore, model_store_block)  # its credentials read the API key, as deploy wrote it
    if stack:
        check_stack_name(stack)
        state = require_state(store, stack)
        region = state.settings.get("region")
        endpoint_url, api_key_secret = state.endpoint.url, state.endpoint.api_key_secret
        served_model_name = served_model_name or state.endpoint.served_model_name
        max_len = state.settings.get("max_model_len")
        adapters = sorted(state.adapters)
    elif not (endpoint_url and api_key_secret and served_model_name):
        raise PipelineInputError("give a stack, or endpoint_url + api_key_secret + served_model_name")
    names = [served_model_name, *adapters]
    if served_model_names:
        unknown = sorted(set(served_model_names) - set(names))
        if unknown:
            raise PipelineInputError(f"{unknown} not served by {stack or endpoint_url} (it serves {names})")
        names = [n for n in names if n in served_model_names]
    gates = {**(gates or {}), **({served_model_name: gate} if gate else {})}
    base_gate = gates.get(served_model_name) or (served_model_name if has_own_gate(served_model_name) else None)
    for name in adapters:  # an adapter without a profile of its own is held to its base model's
        if name not in gates and not has_own_gate(name) and base_gate:
            gates[name] = base_gate
    key, api_key = f"validate-{stack or 'endpoint'}", read_secret(api_key_secret, store.credentials, region).get_secret_value()
    gateway = _gateway_checks(state, store, region) if stack else []
    reports = [
        validate_endpoint(endpoint_url, api_key, name, max_model_len=max_len, level=level, gate=gates.get(name),
                          extra_cases=extra_cases, bfcl_suite=bfcl, thresholds=thresholds, warmup_requests=warmup_requests, modes=modes,
                          suite_concurrency=suite_concurrency,
                          artifact_key=key if name == served_model_name else _name_key(key, name),
                          extra_checks=gateway if name == names[0] else None,
                          raise_on_failure=len(names) == 1)
        for name in names
    ]
    if len(reports) > 1:
        _comparison(reports, key)
    failed = [r for r in reports if not r.passed]
    if failed:
        raise ValidationFailed("validation failed for " + " | ".join(
            f"{r.served_model_name}: " + ", ".join(f"{c.name} ({'; '.join(c.problems)})" for c in r.checks if not c.passed)
            for r in failed))
    return reports[0].model_copy(update={"adapters": reports[1:]})
