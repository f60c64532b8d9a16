"""A BFCL-format data set as the tool-calling suite (tasks/validation/bfcl.py): the conversion,
its meaning under the checker, and one-line errors naming the file and line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.core.errors import PipelineInputError
from tasks.validation import suite as S
from tasks.validation.bfcl import expected_calls, load_bfcl_suite, to_schema, to_tool, to_tools
from tasks.validation.checker import ToolCall, check_calls

SAMPLE = Path(__file__).resolve().parent / "data" / "bfcl" / "sample"


def _fn(name, properties, required=()):
    return {"name": name, "description": "d", "parameters": {"type": "dict", "properties": properties, "required": list(required)}}


def _check(functions, ground_truth, *calls):
    tools = to_tools(functions)
    expected = expected_calls(ground_truth, functions)
    return check_calls([ToolCall(name=n, arguments=json.dumps(a)) for n, a in calls], tools, expected, "semantic")


# --------------------------------------------------------------------------------------------
# Function docs -> JSON schema
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bfcl", "json_type"), [
    ("dict", "object"), ("float", "number"), ("tuple", "array"), ("any", "string"), ("integer", "integer"),
    ("boolean", "boolean"), ("array", "array"), ("string", "string"), ("list", "array"), ("bool", "boolean"),
    ("HashMap", "string"),  # not a Python-category type: BFCL falls back to string too
])
def test_types(bfcl, json_type):
    assert to_schema({"type": bfcl, "description": "x"}, "p")["type"] == json_type


def test_schema_recurses_and_cleans():
    out = to_schema({"type": "dict", "description": "d", "properties": {
        "a": {"type": "float", "description": "A."},
        "b": {"type": "array", "items": {"type": "dict", "properties": {"c": {"type": "tuple", "items": {"type": "float"}}}}},
        "e": {"description": "no type"},
        "f": {"type": "string", "required": True, "optional": True, "enum": ["x"], "default": "x"},
    }, "required": ["a"]}, "p")
    assert out["type"] == "object" and out["required"] == ["a"]
    a = out["properties"]["a"]
    assert a == {"type": "number", "format": "float", "description": "A. This is a float type value."}
    c = out["properties"]["b"]["items"]["properties"]["c"]
    assert out["properties"]["b"]["items"]["type"] == "object" and c["type"] == "array" and c["items"]["type"] == "number"
    assert out["properties"]["e"]["type"] == "string"
    assert out["properties"]["f"] == {"type": "string", "enum": ["x"], "default": "x"}  # required: true / optional dropped


def test_tool_names_and_shape():
    name, spec = to_tool(_fn("math.factorial", {"number": {"type": "integer", "description": "n"}}, ["number"]))
    assert name == "math_factorial"
    assert spec["description"] == "d"
    assert spec["parameters"] == {"type": "object", "properties": {"number": {"type": "integer", "description": "n"}},
                                  "required": ["number"]}
    assert to_tool({"name": "ping"})[1]["parameters"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize(("function", "fact"), [
    ({"description": "no name"}, "has no name"),
    ({"name": "f", "parameters": "x"}, "parameters must be an object"),
    ({"name": "f", "parameters": {"type": "dict", "properties": {"a": "string"}}}, "must be an object"),
    ({"name": "f", "parameters": {"type": "dict", "properties": {"a": {"type": "string", "enum": "x"}}}}, "not a valid schema"),
])
def test_bad_function_docs(function, fact):
    with pytest.raises(ValueError, match=fact):
        to_tool(function)


# --------------------------------------------------------------------------------------------
# Possible answers -> expected calls, and what they accept
# --------------------------------------------------------------------------------------------

WEATHER = [_fn("weather.get", {"city": {"type": "string", "description": "."},
                               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "."},
                               "days": {"type": "integer", "description": "."},
                               "hourly": {"type": "boolean", "description": "."}}, ["city"])]
WEATHER_TRUTH = [{"weather.get": {"city": ["Paris", "Paris, France"], "unit": ["celsius", ""], "days": [1]}}]


def test_expected_arguments():
    [e] = expected_calls(WEATHER_TRUTH, WEATHER)
    assert e.name == "weather_get"
    assert e.arguments == {"city": {"one_of": ["Paris", "Paris, France"]}, "unit": {"optional": "celsius"},
                           "days": 1, "hourly": {"absent": True}}


@pytest.mark.parametrize(("args", "ok"), [
    ({"city": "paris", "days": 1}, True),
    ({"city": "PARIS, france", "unit": "celsius", "days": 1}, True),
    ({"city": "Paris", "unit": "", "days": 1}, True),  # "" for an optional string: not given (BFCL's convention)
    ({"city": "Paris", "unit": "fahrenheit", "days": 1}, False),
    ({"city": "Paris"}, False),  # days answered without "": it must be given
    ({"city": "Paris", "days": 1.0}, False),  # 5.0 is not an integer (as in BFCL)
    ({"city": "Paris", "days": 1, "hourly": True}, False),  # not in the answer: must be left out
    ({"city": "Lyon", "days": 1}, False),
])
def test_optional_absent_or_equal(args, ok):
    assert (_check(WEATHER, WEATHER_TRUTH, ("weather_get", args)) == []) is ok


def test_free_form_dict_parameter():
    functions = [_fn("grades.set", {"grades": {"type": "dict", "description": "subject -> score"}}, ["grades"])]
    truth = [{"grades.set": {"grades": [{"math": [90], "art": [75, ""]}]}}]
    assert _check(functions, truth, ("grades_set", {"grades": {"math": 90, "art": 75}})) == []
    assert _check(functions, truth, ("grades_set", {"grades": {"math": 90}})) == []
    assert _check(functions, truth, ("grades_set", {"grades": {"math": 90, "gym": 1}}))
    assert _check(functions, truth, ("grades_set", {"grades": {"art": 75}}))


def test_list_of_dicts_and_empty_list_for_optional_array():
    functions = [_fn("order", {"items": {"type": "array", "description": ".", "items": {"type": "dict", "properties": {
        "sku": {"type": "string"}, "qty": {"type": "integer"}}}}, "tags": {"type": "array", "items": {"type": "string"}}},
        ["items"])]
    truth = [{"order": {"items": [[{"sku": ["A1"], "qty": [2, ""]}]], "tags": [["gift"], ""]}}]
    assert _check(functions, truth, ("order", {"items": [{"sku": "a1"}]})) == []
    assert _check(functions, truth, ("order", {"items": [{"sku": "A1", "qty": 2}], "tags": []})) == []
    assert _check(functions, truth, ("order", {"items": [{"sku": "A1", "qty": 2}, {"sku": "A1"}]}))


def test_parallel_answers_in_any_order():
    functions = [_fn("get_weather", {"city": {"type": "string", "description": "."}}, ["city"])]
    truth = [{"get_weather": {"city": ["Paris"]}}, {"get_weather": {"city": ["Tokyo"]}}]
    assert _check(functions, truth, ("get_weather", {"city": "Tokyo"}), ("get_weather", {"city": "Paris"})) == []
    assert _check(functions, truth, ("get_weather", {"city": "Tokyo"}))


@pytest.mark.parametrize(("truth", "fact"), [
    ([], "non-empty list"),
    ([{"weather.get": {"city": "Paris"}}], "must list its accepted values"),
    ([{"other": {"city": ["Paris"]}}], "does not offer"),
    ([{"weather.get": {"city": ["Paris"]}, "x": {}}], "ground_truth\\[0\\]"),
])
def test_bad_answers(truth, fact):
    with pytest.raises(ValueError, match=fact):
        expected_calls(truth, WEATHER)


# --------------------------------------------------------------------------------------------
# Files -> suite
# --------------------------------------------------------------------------------------------

def test_sample_folder_converts_to_a_suite():
    raw = load_bfcl_suite({"folder": str(SAMPLE)})
    cases = {c["id"]: c for c in raw["cases"]}
    assert len(cases) == 11
    assert {c["category"] for c in cases.values()} == {"simple", "multiple", "parallel", "irrelevance"}
    assert cases["parallel_multiple_24"]["category"] == "parallel"
    assert cases["parallel_0"]["modes"] == ["auto", "required", "none"]
    assert cases["irrelevance_0"]["expected"] == [] and cases["irrelevance_0"]["modes"] == ["auto", "none"]
    assert cases["simple_python_1"]["tools"] == ["math_factorial"]
    assert cases["simple_python_1"]["messages"][0]["role"] == "user"
    assert cases["live_simple_2-2-0"]["expected"][0]["name"] == "uber_ride"
    # simple_python_0 and _11 define calculate_triangle_area differently: the later one is renamed
    assert cases["simple_python_0"]["tools"] == ["calculate_triangle_area"]
    assert cases["simple_python_11"]["tools"] == ["calculate_triangle_area_2"]
    assert cases["simple_python_11"]["expected"][0]["name"] == "calculate_triangle_area_2"
    assert raw["tools"]["calculate_triangle_area"] != raw["tools"]["calculate_triangle_area_2"]
    suite = S.load_suite(bfcl=raw)
    assert {c.id for c in suite.cases} == set(cases)  # the BFCL cases replace the repo's own


def test_the_suite_takes_the_spec_itself_and_modes_and_extra_cases():
    spec = {"questions": str(SAMPLE / "BFCL_v4_simple_python.json"), "answers": str(SAMPLE / "possible_answer" / "BFCL_v4_simple_python.json"),
            "limit": 2}
    extra = {"cases": [{"id": "mine", "category": "simple", "tools": ["math_factorial"], "messages": [{"role": "user", "content": "5!"}],
                        "expected": [{"name": "math_factorial", "arguments": {"number": 5}}]}]}
    suite = S.load_suite(extra, ["auto"], spec)
    assert [c.id for c in suite.cases] == ["simple_python_0", "simple_python_1", "mine"]
    assert all(c.modes == ["auto"] for c in suite.cases)
    assert suite.cases[0].max_tokens == 256


def test_include_default_keeps_the_repo_cases_and_their_tools():
    default = S.load_suite()
    questions = [{"id": "simple_python_900", "question": [[{"role": "user", "content": "weather in Rome"}]],
                  "function": [_fn("get_current_weather", {"town": {"type": "string", "description": "."}}, ["town"])]}]
    answers = [{"id": "simple_python_900", "ground_truth": [{"get_current_weather": {"town": ["Rome"]}}]}]
    suite = S.load_suite(bfcl=load_bfcl_suite({"questions": _write(questions), "answers": _write(answers), "include_default": True}))
    assert {c.id for c in default.cases} < {c.id for c in suite.cases}
    assert suite.tools["get_current_weather"] == default.tools["get_current_weather"]  # the repo's tool is not replaced
    assert [c.tools for c in suite.cases if c.id == "simple_python_900"] == [["get_current_weather_2"]]


_TMP: list[Path] = []


def _write(rows, raw: str | None = None) -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "BFCL_v4_simple_python.json"
    _TMP.append(path.parent)
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def _cleanup():
    yield
    while _TMP:
        shutil.rmtree(_TMP.pop(), ignore_errors=True)


Q = {"id": "simple_python_0", "question": [[{"role": "user", "content": "factorial of 5"}]],
     "function": [_fn("math.factorial", {"number": {"type": "integer", "description": "."}}, ["number"])]}
A = {"id": "simple_python_0", "ground_truth": [{"math.factorial": {"number": [5]}}]}


@pytest.mark.parametrize(("questions", "answers", "facts"), [
    ('{"id": "simple_python_0", "question": [[', None, ("line 1", "not JSON")),
    ("\n[1, 2]\n", None, ("line 2", "JSON object", "list")),
    (json.dumps({**Q, "id": None}), None, ("line 1", "no 'id'")),
    (json.dumps({**Q, "question": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]}), None,
     ("line 1", "one turn")),
    (json.dumps({**Q, "question": [[{"role": "user"}]]}), None, ("line 1", "role and a text content")),
    (json.dumps({**Q, "function": []}), None, ("line 1", "non-empty list")),
    (json.dumps({**Q, "function": [{"name": "f", "parameters": []}]}), None, ("line 1", "parameters must be an object")),
    (json.dumps({**Q, "id": "multi_turn_base_0"}), None, ("line 1", "multi_turn_base", "not supported")),
    (json.dumps(Q) + "\n" + json.dumps(Q), json.dumps(A), ("line 2", "already on", "line 1")),
    (json.dumps(Q), "", ("line 1", "no possible answer", "simple_python_0")),
    (json.dumps(Q), json.dumps({"id": "simple_python_0"}), ("line 1", "no 'ground_truth'")),
    (json.dumps(Q), "\n\n" + json.dumps({**A, "ground_truth": [{"math.gcd": {"a": [1]}}]}), ("line 3", "does not offer")),
    (json.dumps(Q), json.dumps(A) + "\n" + json.dumps(A), ("line 2", "answered twice")),
    (json.dumps(Q), "{oops", ("line 1", "not JSON")),
])
def test_malformed_files_fail_on_one_line_naming_file_and_line(questions, answers, facts):
    q_path = _write(None, questions)
    spec = {"questions": q_path}
    if answers is not None:
        spec["answers"] = _write(None, answers)
    with pytest.raises(PipelineInputError) as err:
        load_bfcl_suite(spec)
    message = str(err.value)
    assert "\n" not in message
    assert any(p in message for p in (q_path, spec.get("answers", "-"))), message
    for fact in facts:
        assert fact in message, message


@pytest.mark.parametrize(("spec", "fact"), [
    ({}, "either questions"),
    ({"questions": "a.json", "folder": "x"}, "either questions"),
    ({"folder": "x", "categories": ["multi_turn_base"]}, "not supported"),
    ({"questions": "a.json", "limit": 0}, "limit"),
    ({"questions": "a.json", "bogus": 1}, "bogus"),
    ({"questions": "/nonexistent/BFCL_v4_simple_python.json"}, "not found"),
    ({"folder": "/nonexistent"}, "not found"),
    ({"folder": str(SAMPLE), "categories": ["live_multiple"]}, "live_multiple"),
    ({"questions": "s3://bucket/q.json"}, "credentials"),
])
def test_bad_specs(spec, fact):
    with pytest.raises(PipelineInputError, match=fact):
        load_bfcl_suite(spec)


def test_not_utf8():
    path = _write(None, "")
    Path(path).write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(PipelineInputError, match="not UTF-8"):
        load_bfcl_suite({"questions": path})


def test_category_override():
    path = _write([{**Q, "id": "my-question"}])
    raw = load_bfcl_suite({"questions": path, "category": "irrelevance"})
    assert raw["cases"][0]["category"] == "irrelevance" and raw["cases"][0]["expected"] == []


@pytest.mark.integration
def test_reads_from_s3(bucket):
    from tasks.core.aws import aws_client

    s3 = aws_client("s3")
    for path in SAMPLE.rglob("*.json"):
        s3.upload_file(str(path), bucket, f"bfcl/{path.relative_to(SAMPLE)}")
    by_folder = load_bfcl_suite({"folder": f"s3://{bucket}/bfcl", "categories": ["parallel", "irrelevance"]}, s3=lambda: s3)
    assert [c["id"] for c in by_folder["cases"]] == ["parallel_0", "parallel_3", "irrelevance_0", "irrelevance_1"]
    by_file = load_bfcl_suite({"questions": f"s3://{bucket}/bfcl/BFCL_v4_multiple.json",
                               "answers": f"s3://{bucket}/bfcl/possible_answer/BFCL_v4_multiple.json"}, s3=lambda: s3)
    assert by_file == load_bfcl_suite({"questions": str(SAMPLE / "BFCL_v4_multiple.json"),
                                       "answers": str(SAMPLE / "possible_answer" / "BFCL_v4_multiple.json")})
    with pytest.raises(PipelineInputError, match="not found"):
        load_bfcl_suite({"questions": f"s3://{bucket}/bfcl/none.json"}, s3=lambda: s3)
