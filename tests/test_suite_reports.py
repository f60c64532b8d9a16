"""What the tool suite reports for replies a model really gives (no server: a scripted endpoint)."""

from __future__ import annotations

from tasks.core.endpoint import Reply
from tasks.validation.suite import Suite, gate_failures, load_gate, load_suite, run_case


class Scripted:
    """An endpoint that answers every chat with the next scripted Reply."""

    def __init__(self, *replies: Reply):
        self.replies, self.bodies = list(replies), []

    def chat(self, body: dict, stream: bool = False) -> Reply:
        self.bodies.append(body)
        return self.replies.pop(0) if self.replies else Reply(status=200, body={}, content="ok", finish_reason="stop")


def _suite() -> tuple[Suite, object]:
    suite = load_suite()
    return suite, next(c for c in suite.cases if c.id == "server-time")


def test_default_suite_has_a_zero_parameter_tool_under_required_and_named():
    suite, case = _suite()
    assert suite.tools["get_server_time"]["parameters"].get("properties") == {}
    assert {"required", "named"} <= set(case.modes)


def test_a_call_cut_off_by_max_tokens_is_reported_as_cut_off_not_as_missing():
    suite, case = _suite()
    padded = '<tool_call>\n{"name": "get_server_time", "arguments": {' + "\n" * 60
    ep = Scripted(Reply(status=200, body={}, content=padded, finish_reason="length"))
    result = run_case(ep, suite, case, "required", "semantic")
    assert not result.passed
    assert result.reason.startswith(f"tool call cut off by max_tokens={case.max_tokens} (finish_reason=length)")
    assert "got none" not in result.reason


def test_a_text_answer_cut_off_under_auto_keeps_the_real_problem_and_says_it_was_cut():
    suite = load_suite()
    case = next(c for c in suite.cases if c.id == "weather-paris")
    ep = Scripted(Reply(status=200, body={}, content="To find the weather in Paris I would " * 10, finish_reason="length"))
    result = run_case(ep, suite, case, "auto", "semantic")
    assert "expected a call to ['get_current_weather'], got none" in result.reason
    assert f"the reply was cut off by max_tokens={case.max_tokens}" in result.reason


def test_a_complete_zero_parameter_call_passes():
    suite, case = _suite()
    call = {"id": "c1", "name": "get_server_time", "arguments": "{}"}
    ep = Scripted(Reply(status=200, body={}, tool_calls=[call], finish_reason="tool_calls"))
    result = run_case(ep, suite, case, "named", "semantic")
    assert result.passed, result.reason
    assert ep.bodies[0]["tool_choice"] == {"type": "function", "function": {"name": "get_server_time"}}


def test_default_model_gate_every_gated_cell_can_fail():
    """A gate with teeth: for each gated cell, all-failing results fail the gate."""
    from tasks.validation.suite import CaseResult

    suite, gate = load_suite(), load_gate("smollm2-135m-instruct")
    runs = [(c, m) for c in suite.cases for m in c.modes]
    gated = {(c.category, m) for c, m in runs if gate.requires(c.category, m)}
    assert gated  # the default model is held to something
    for cell in gated:
        results = [CaseResult(case=c.id, category=c.category, mode=m, passed=(c.category, m) != cell) for c, m in runs]
        assert any(f.startswith(f"{cell[0]} x {cell[1]}:") for f in gate_failures(results, gate)), cell
