"""The project's checker (level `semantic`) against BFCL's own AST checker, as an oracle.

The judged calls (tests/data/bfcl): BFCL questions with right answers and mutations of them,
hand-written edge cases, and real outputs of the default model and its tool-calling adapter on
BFCL questions. Each is judged by BFCL's `ast_checker` (bfcl-eval, run in .venv-bfcl by
tests/bfcl_oracle.py) and by `check_calls` on the suite tasks/validation/bfcl.py converts it to.
They must agree on at least 98 % of the calls, and every disagreement must be one of the
deliberate differences listed (and argued) in docs/validation-bfcl.md.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tasks.validation.bfcl import expected_calls, to_tools
from tasks.validation.checker import ToolCall, check_calls, check_semantics

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "bfcl"
ORACLE_PYTHON = REPO / ".venv-bfcl" / "bin" / "python"
TARGET = 0.98


def _calls(model_output: list[dict]) -> list[ToolCall]:
    return [ToolCall(name=name, arguments=json.dumps(args)) for call in model_output for name, args in call.items()]


def judged_calls() -> tuple[list[dict], int]:
    """Every judged call in BFCL's formats, and how many real outputs were left out because their
    arguments are not a JSON object (BFCL's decoder refuses those before its checker runs)."""
    cases, undecodable = [], 0
    for line in (DATA / "agreement_cases.jsonl").read_text().splitlines():
        q = json.loads(line)
        source = "hand-written" if q["id"].startswith("hw_") else "BFCL question, generated output"
        for kind, output in q["outputs"].items():
            cases.append({"id": f"{q['id']}/{kind}", "category": q["category"], "functions": q["function"],
                          "possible_answer": q["ground_truth"], "model_output": output, "source": source})
    for line in (DATA / "smollm2_outputs.jsonl").read_text().splitlines():
        row = json.loads(line)
        try:
            output = [{c["name"]: json.loads(c["arguments"] or "{}")} for c in row["calls"]]
        except json.JSONDecodeError:
            undecodable += 1
            continue
        if not all(isinstance(args, dict) for call in output for args in call.values()):
            undecodable += 1
            continue
        cases.append({"id": f"{row['id']}/{row['served']}/{row['tool_choice']}", "category": row["category"],
                      "functions": row["functions"], "possible_answer": row["possible_answer"], "model_output": output,
                      "source": "real model output"})
    return cases, undecodable


def ours(case: dict) -> list[str]:
    tools = to_tools(case["functions"])
    expected = expected_calls(case["possible_answer"], case["functions"])
    return check_calls(_calls(case["model_output"]), tools, expected, "semantic")


# --------------------------------------------------------------------------------------------
# The deliberate differences (docs/validation-bfcl.md), each recognised by what it looks like
# --------------------------------------------------------------------------------------------

def _greedy_fails(case: dict) -> bool:
    """BFCL matches parallel calls greedily: each expected call takes the first unused call it accepts."""
    expected = expected_calls(case["possible_answer"], case["functions"])
    left = _calls(case["model_output"])
    for exp in expected:
        match = next((c for c in left if not check_semantics(c, exp)), None)
        if match is None:
            return True
        left.remove(match)
    return False


def _is_full_matching(case, problems, oracle) -> bool:
    return (not problems and not oracle["valid"] and "parallel" in case["category"]
            and oracle["error_type"].endswith("cannot_find_match") and _greedy_fails(case))


def _is_int_in_number_array(case, problems, oracle) -> bool:
    return not problems and not oracle["valid"] and oracle["error_type"] == "type_error:nested"


def _is_schema_type(case, problems, oracle) -> bool:
    """BFCL accepts a value of its answer's type even where that contradicts the declared type
    (its 'variable' rule: a null where the answer lists None); the project holds calls to the schema."""
    return bool(problems) and oracle["valid"] and all("is not of type" in p for p in problems)


def _is_enum(case, problems, oracle) -> bool:
    """BFCL never checks `enum`; the project does (an answer or an explicit "" outside the enum)."""
    return bool(problems) and oracle["valid"] and all("is not one of" in p for p in problems)


DELIBERATE = {
    "full-matching": _is_full_matching,
    "int-in-number-array": _is_int_in_number_array,
    "schema-types": _is_schema_type,
    "enum-enforced": _is_enum,
}


# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judged():
    if not ORACLE_PYTHON.exists():
        pytest.fail(f"{ORACLE_PYTHON} is missing: run `make setup` (scripts/setup.sh makes BFCL's checker environment)")
    cases, undecodable = judged_calls()
    request = {"cases": [{k: c[k] for k in ("id", "category", "functions", "possible_answer", "model_output")} for c in cases]}
    out = subprocess.run([str(ORACLE_PYTHON), str(REPO / "tests" / "bfcl_oracle.py")], input=json.dumps(request),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    verdicts = json.loads(out.stdout)
    return [(c, ours(c), verdicts[c["id"]]) for c in cases], undecodable


def test_agrees_with_bfcl(judged, capsys):
    rows, undecodable = judged
    disagreements = [(c, p, o) for c, p, o in rows if (not p) != o["valid"]]
    unexplained, lines = [], []
    for case, problems, oracle in disagreements:
        why = next((name for name, matches in DELIBERATE.items() if matches(case, problems, oracle)), None)
        if why is None:
            unexplained.append(case["id"])
        lines.append(f"  {case['id']} ({case['source']}): project {'pass' if not problems else 'FAIL'}, "
                     f"BFCL {'pass' if oracle['valid'] else 'FAIL'} [{oracle['error_type']}] -> {why or 'UNEXPLAINED'}"
                     + (f"; project: {'; '.join(problems)[:200]}" if problems else f"; BFCL: {oracle['error'][:200]}"))
    agree = len(rows) - len(disagreements)
    by_source = {}
    for c, p, o in rows:
        a, n = by_source.get(c["source"], (0, 0))
        by_source[c["source"]] = (a + ((not p) == o["valid"]), n + 1)
    valid = sum(o["valid"] for _, _, o in rows)
    with capsys.disabled():
        print(f"\nBFCL agreement: {agree}/{len(rows)} judged calls = {agree / len(rows):.1%} "
              f"(BFCL accepts {valid}, refuses {len(rows) - valid}; "
              + ", ".join(f"{s}: {a}/{n}" for s, (a, n) in by_source.items())
              + f"; {undecodable} real outputs with undecodable arguments left out)")
        print("\n".join(lines))
    assert len(rows) >= 300
    assert not unexplained, f"disagreements that are not deliberate differences: {unexplained}"
    assert agree / len(rows) >= TARGET


@pytest.mark.parametrize(("case_id", "valid"), [
    ("hw_freeform_dict/right", True),
    ("hw_freeform_dict/right-optional-key-left-out", True),
    ("hw_freeform_dict/wrong-extra-key", False),
    ("simple_python_337/right", True),  # BFCL's own question with a free-form dict parameter
    ("hw_optional_absent_or_x/right-absent", True),
    ("hw_optional_absent_or_x/right-given", True),
    ("hw_optional_absent_or_x/wrong-other-enum", False),
    ("hw_optional_must_be_given/wrong-optional-left-out", False),
    ("hw_types/wrong-5.0-for-integer", False),
    ("hw_string_normalisation/right", True),
    ("hw_string_normalisation/right-punctuation", True),
])
def test_key_cases_covered_and_agree(judged, case_id, valid):
    rows, _ = judged
    [(case, problems, oracle)] = [r for r in rows if r[0]["id"] == case_id]
    assert oracle["valid"] is valid, oracle
    assert (not problems) is valid, problems
