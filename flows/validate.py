"""validate: readiness, warm-up, smoke, streaming, the tool-calling suite and latency against an endpoint.

Fails the run (not just logs) when a required check fails, naming what failed.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, NonNegativeInt

from blocks.loading import load_config
from blocks.model_store import ModelStore
from tasks.endpoint import Endpoint, EndpointError
from tasks.errors import PipelineInputError, flow
from tasks.naming import check_stack_name
from tasks.secrets import read_secret
from tasks.s3 import s3_client
from tasks.state import require_state
from tasks.validation.bfcl import load_bfcl_suite
from tasks.validation.checker import Level
from tasks.validation.checks import (
    CheckResult, LatencyThresholds, Samples, check_readiness, latency_summary, smoke, streaming, tool_suite, warm_up,
)
from tasks.validation.suite import CATEGORIES, CaseResult, Mode, has_own_gate, load_gate, load_suite, matrix


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
    bfcl_suite: dict | None = None,
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
            tools_check, cases, s = tool_suite(ep, suite, gate_profile)
            checks.append(tools_check)
            samples.extend(s)
            checks.append(latency_summary(samples, thresholds))
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


def _artifacts(report: ValidationReport, gate, key: str) -> None:
    create_table_artifact(
        [{"case": c.case, "category": c.category, "tool_choice": c.mode, "result": "pass" if c.passed else "FAIL",
          "gated": "yes" if gate.requires(c.category, c.mode) else "no", "latency_s": round(c.seconds, 2), "reason": c.reason}
         for c in report.cases],
        key=f"{key}-cases", description=f"Tool-calling cases ({gate.level})",
    )
    modes = ["auto", "required", "named", "none"]
    lines = [f"# Validation of `{report.served_model_name}` at {report.endpoint}: {'PASSED' if report.passed else 'FAILED'}", "",
             f"Transient endpoint failures retried (429/502/503/504, resets): {report.retries}", "",
             "| check | result | seconds | details |", "|---|---|---:|---|"]
    for c in report.checks:
        detail = "; ".join(c.problems) if c.problems else ", ".join(f"{k}={v}" for k, v in c.details.items() if k != "models")
        lines.append(f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.seconds:.1f} | {detail[:300]} |")
    lines += ["", f"## Tool calling ({gate.level}): pass rate by category × tool_choice (* = gated)", "",
              "| category | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for cat in CATEGORIES:
        row = []
        for m in modes:
            cell = report.matrix.get(f"{cat}/{m}")
            row.append("–" if cell is None else cell + ("*" if gate.requires(cat, m) else ""))
        lines.append(f"| {cat} | " + " | ".join(row) + " |")
    failed = [c for c in report.cases if not c.passed]
    if failed:
        lines += ["", "## Failed cases", ""] + [f"- `{c.case}` ({c.category} × {c.mode}): {c.reason}" for c in failed]
    create_markdown_artifact("\n".join(lines), key=key, description="Validation summary")


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
    model_store_block: str | None = None,
) -> ValidationReport:
    """Validate stack `stack` (its endpoint from the state record) or an explicit endpoint
    (`endpoint_url`, `served_model_name`, and `api_key_secret`: a Secrets Manager id, never the key).
    A stack is validated under each served name: the base model and every LoRA adapter
    (`served_model_names` picks some), each with its gate profile (`gates`: name -> profile;
    default the profile named after the served name; an adapter without one gets its base
    model's; else default.yaml; `gate` is the base model's). `modes` runs only those tool_choice
    modes of the suite (["auto"]: a quick run of what each model decides by itself). `bfcl_suite`
    runs a BFCL-format data set instead of the repo's cases (docs/validation-bfcl.md): e.g.
    {"questions": "s3://b/BFCL_v4_simple_python.json", "answers": "s3://b/possible_answer/BFCL_v4_simple_python.json"}."""
    bfcl = load_bfcl_suite(bfcl_suite, s3=lambda: s3_client(load_config(ModelStore, model_store_block))) if bfcl_suite else None
    max_len, adapters = None, []
    if stack:
        check_stack_name(stack)
        state = require_state(load_config(ModelStore, model_store_block), stack)
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
    key, api_key = f"validate-{stack or 'endpoint'}", read_secret(api_key_secret).get_secret_value()
    reports = [
        validate_endpoint(endpoint_url, api_key, name, max_model_len=max_len, level=level, gate=gates.get(name),
                          extra_cases=extra_cases, bfcl_suite=bfcl, thresholds=thresholds, warmup_requests=warmup_requests, modes=modes,
                          artifact_key=key if name == served_model_name else _name_key(key, name),
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
