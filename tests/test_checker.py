"""Unit tests for the tool-call checker and the suite/gate plumbing (no network, no server)."""

from __future__ import annotations

import json

import pytest

from tasks.core.errors import PipelineInputError
from tasks.validation import suite as S
from tasks.validation.checker import ExpectedCall, ToolCall, check_calls, check_semantics, check_structure

TOOLS: dict[str, dict] = {
    "get_current_weather": {
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
    "convert_currency": {
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from_currency": {"type": "string", "enum": ["USD", "EUR"]},
                "to_currency": {"type": "string", "enum": ["USD", "EUR"]},
            },
            "required": ["amount", "from_currency", "to_currency"],
        },
    },
    "ship_parcel": {
        "parameters": {
            "type": "object",
            "properties": {
                "address": {
                    "type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                    "required": ["street", "city"],
                },
                "options": {"type": "array", "items": {"type": "string", "enum": ["fragile", "express", "insured"]}},
            },
            "required": ["address"],
        },
    },
    "get_time": {"description": "Zero-parameter tool.", "parameters": {"type": "object", "properties": {}}},
    "ping": {"description": "Zero-parameter tool with no parameters key at all."},
}


def call(name: str, args: dict | str | list | None = None) -> ToolCall:
    if args is None:
        args = {}
    return ToolCall(name=name, arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def exp(name: str, **arguments) -> ExpectedCall:
    return ExpectedCall(name=name, arguments=arguments)


def _has_all(problems: list[str], *facts: str) -> bool:
    return any(all(f in p for f in facts) for p in problems)


# --------------------------------------------------------------------------------------------
# check_structure
# --------------------------------------------------------------------------------------------

VALID_CALLS = [
    pytest.param(call("get_current_weather", {"city": "Paris"}), id="optional-args-omitted"),
    pytest.param(call("get_current_weather", {"city": "Paris", "unit": "celsius", "days": 3}), id="all-args"),
    pytest.param(call("convert_currency", {"amount": 10, "from_currency": "USD", "to_currency": "EUR"}), id="int-as-number"),
    pytest.param(call("convert_currency", {"amount": 10.5, "from_currency": "USD", "to_currency": "EUR"}), id="float-number"),
    pytest.param(call("ship_parcel", {"address": {"street": "1 Main St", "city": "Oslo"}}), id="nested-object"),
    pytest.param(call("ship_parcel", {"address": {"street": "x", "city": "y"}, "options": ["fragile", "express"]}), id="enum-array"),
    pytest.param(call("ship_parcel", {"address": {"street": "x", "city": "y"}, "options": []}), id="empty-enum-array"),
    pytest.param(call("get_time", "{}"), id="zero-param-empty-object"),
    pytest.param(call("get_time", ""), id="zero-param-empty-string"),
    pytest.param(call("get_time", "   "), id="zero-param-whitespace"),
    pytest.param(call("ping", "{}"), id="no-parameters-key"),
    pytest.param(call("get_current_weather", {"city": "São Paulo"}), id="unicode-accented"),
    pytest.param(call("get_current_weather", {"city": "東京"}), id="unicode-cjk"),
    pytest.param(call("get_current_weather", '{"city": "S\\u00e3o Paulo"}'), id="unicode-escaped"),
]


@pytest.mark.parametrize("c", VALID_CALLS)
def test_structure_valid(c):
    assert check_structure(c, TOOLS) == []


# (call, facts that must all appear in one problem string)
INVALID_CALLS = [
    pytest.param(call("get_weather", {"city": "Paris"}), ("get_weather", "unknown function"), id="wrong-function-name"),
    pytest.param(call("get_current_weather", {"unit": "celsius"}), ("get_current_weather", "missing required", "city"),
                 id="missing-required"),
    pytest.param(call("get_current_weather", {"city": 42}), ("get_current_weather", "city", "42", "string"),
                 id="integer-for-string"),
    pytest.param(call("get_current_weather", {"city": "Paris", "days": "3"}), ("days", "'3'", "integer"),
                 id="string-for-integer"),
    pytest.param(call("get_current_weather", {"city": "Paris", "days": 2.5}), ("days", "2.5", "integer"),
                 id="float-for-integer"),
    pytest.param(call("convert_currency", {"amount": "100", "from_currency": "USD", "to_currency": "EUR"}),
                 ("convert_currency", "amount", "'100'", "number"), id="string-for-number"),
    pytest.param(call("get_current_weather", {"city": "Paris", "unit": "kelvin"}),
                 ("get_current_weather", "unit", "kelvin", "celsius"), id="bad-enum"),
    pytest.param(call("get_current_weather", {"city": "Paris", "country": "FR"}),
                 ("get_current_weather", "unknown argument", "country"), id="unknown-arg"),
    pytest.param(call("get_current_weather", '{"city": "Paris"'), ("get_current_weather", "not valid JSON"),
                 id="malformed-json"),
    pytest.param(call("get_current_weather", "{'city': 'Paris'}"), ("get_current_weather", "not valid JSON"),
                 id="single-quoted-json"),
    pytest.param(call("get_current_weather", '["Paris"]'), ("get_current_weather", "JSON object", "list"),
                 id="json-array"),
    pytest.param(call("get_current_weather", '"Paris"'), ("get_current_weather", "JSON object", "str"),
                 id="json-string"),
    pytest.param(call("get_current_weather", "null"), ("get_current_weather", "JSON object"), id="json-null"),
    pytest.param(call("get_current_weather", ""), ("missing required", "city"), id="empty-args-with-required"),
    pytest.param(call("ship_parcel", {"address": {"street": "1 Main St"}}),
                 ("ship_parcel", "missing required", "city", "address"), id="nested-required-missing"),
    pytest.param(call("ship_parcel", {"address": {"street": "x", "city": "y", "zip": "0150"}}),
                 ("ship_parcel", "unknown argument", "address", "zip"), id="nested-unknown"),
    pytest.param(call("ship_parcel", {"address": "1 Main St, Oslo"}), ("ship_parcel", "address", "object"),
                 id="string-for-object"),
    pytest.param(call("ship_parcel", {"address": {"street": "x", "city": "y"}, "options": ["fragile", "teleport"]}),
                 ("ship_parcel", "options.1", "teleport", "fragile"), id="enum-array-bad-element"),
    pytest.param(call("ship_parcel", {"address": {"street": "x", "city": "y"}, "options": "fragile"}),
                 ("ship_parcel", "options", "array"), id="string-for-array"),
    pytest.param(call("get_time", {"tz": "UTC"}), ("get_time", "unknown argument", "tz"), id="zero-param-given-arg"),
    pytest.param(call("ping", {"x": 1}), ("ping", "unknown argument", "x"), id="no-parameters-key-given-arg"),
]


@pytest.mark.parametrize(("c", "facts"), INVALID_CALLS)
def test_structure_invalid(c, facts):
    problems = check_structure(c, TOOLS)
    assert problems, f"{c} should be refused"
    assert _has_all(problems, *facts), problems


def test_structure_wrong_name_lists_offered():
    problems = check_structure(call("get_weather", {"city": "Paris"}), TOOLS)
    assert len(problems) == 1 and "get_current_weather" in problems[0]


def test_structure_reports_every_problem():
    problems = check_structure(call("convert_currency", {"amount": "ten", "from_currency": "CHF", "extra": 1}), TOOLS)
    assert _has_all(problems, "amount", "number")
    assert _has_all(problems, "from_currency", "CHF")
    assert _has_all(problems, "missing required", "to_currency")
    assert _has_all(problems, "unknown argument", "extra")


def test_structure_respects_explicit_additional_properties():
    tools = {"f": {"parameters": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True}}}
    assert check_structure(call("f", {"a": "x", "b": 1}), tools) == []


def test_structure_does_not_mutate_tool_schema():
    before = json.dumps(TOOLS, sort_keys=True)
    check_structure(call("ship_parcel", {"address": {"street": "x", "city": "y", "zip": 1}}), TOOLS)
    assert json.dumps(TOOLS, sort_keys=True) == before


# --------------------------------------------------------------------------------------------
# check_semantics
# --------------------------------------------------------------------------------------------

SEMANTIC_OK = [
    pytest.param(call("get_current_weather", {"city": "PARIS"}), exp("get_current_weather", city="paris"),
                 id="string-equality-case-insensitive"),
    pytest.param(call("get_current_weather", {"city": "Paris, France"}), exp("get_current_weather", city={"contains": "paris"}),
                 id="contains"),
    pytest.param(call("get_current_weather", {"city": "SÃO PAULO, Brazil"}),
                 exp("get_current_weather", city={"contains": "são paulo"}), id="contains-unicode-case-insensitive"),
    pytest.param(call("get_current_weather", {"city": "東京都"}), exp("get_current_weather", city={"contains": "東京"}),
                 id="contains-cjk"),
    pytest.param(call("get_current_weather", {"city": "São Paulo"}), exp("get_current_weather", city="são paulo"),
                 id="equality-unicode"),
    pytest.param(call("get_current_weather", {"city": "Paris", "unit": "Celsius"}),
                 exp("get_current_weather", unit={"one_of": ["celsius", "fahrenheit"]}), id="one_of-case-insensitive"),
    pytest.param(call("get_current_weather", {"city": "Lyon"}), exp("get_current_weather", city={"any": True}), id="any"),
    pytest.param(call("convert_currency", {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}),
                 exp("convert_currency", amount=100.0), id="numbers-equal-int-float"),
    pytest.param(call("convert_currency", {"amount": 2.5, "from_currency": "USD", "to_currency": "EUR"}),
                 exp("convert_currency", amount=2.5), id="numbers-equal"),
    pytest.param(call("get_current_weather", {"city": "Paris", "unit": "celsius"}), exp("get_current_weather", city="Paris"),
                 id="unconstrained-extra-arg-ignored"),
    pytest.param(call("get_time", ""), exp("get_time"), id="zero-param-empty-string"),
    pytest.param(call("ship_parcel", {"address": {"street": "1 Main St", "city": "OSLO"}, "options": ["Fragile", "express"]}),
                 exp("ship_parcel", address={"city": "oslo"}, options=["fragile", {"any": True}]), id="nested-and-list"),
]


@pytest.mark.parametrize(("c", "e"), SEMANTIC_OK)
def test_semantics_ok(c, e):
    assert check_semantics(c, e) == []


SEMANTIC_BAD = [
    pytest.param(call("get_stock_price", {"ticker": "AAPL"}), exp("get_current_weather", city="Paris"),
                 ("get_stock_price", "get_current_weather"), id="wrong-function"),
    pytest.param(call("get_current_weather", {"city": "Berlin"}), exp("get_current_weather", city="Paris"),
                 ("city", "Berlin", "Paris"), id="wrong-string"),
    pytest.param(call("get_current_weather", {"city": "Berlin"}), exp("get_current_weather", city={"contains": "paris"}),
                 ("city", "Berlin", "paris"), id="contains-miss"),
    pytest.param(call("get_current_weather", {"city": "Paris", "days": 3}), exp("get_current_weather", days={"contains": "3"}),
                 ("days", "3"), id="contains-non-string"),
    pytest.param(call("get_current_weather", {"city": "Paris", "unit": "fahrenheit"}),
                 exp("get_current_weather", unit={"one_of": ["celsius"]}), ("unit", "fahrenheit", "celsius"), id="one_of-miss"),
    pytest.param(call("get_current_weather", {"city": "Paris"}), exp("get_current_weather", unit={"any": True}),
                 ("unit", "missing"), id="any-but-absent"),
    pytest.param(call("convert_currency", {"amount": 10, "from_currency": "USD", "to_currency": "EUR"}),
                 exp("convert_currency", amount=100), ("amount", "10", "100"), id="numbers-differ"),
    pytest.param(call("convert_currency", {"amount": "100", "from_currency": "USD", "to_currency": "EUR"}),
                 exp("convert_currency", amount=100), ("amount", "'100'"), id="string-not-equal-number"),
    pytest.param(call("ship_parcel", {"address": {"street": "x", "city": "Bergen"}}),
                 exp("ship_parcel", address={"city": "oslo"}), ("address", "Bergen"), id="nested-value"),
    pytest.param(call("ship_parcel", {"address": {"street": "x", "city": "y"}, "options": ["fragile"]}),
                 exp("ship_parcel", options=["fragile", "express"]), ("options",), id="list-length"),
]


@pytest.mark.parametrize(("c", "e", "facts"), SEMANTIC_BAD)
def test_semantics_bad(c, e, facts):
    problems = check_semantics(c, e)
    assert problems
    assert _has_all(problems, *facts), problems


# --------------------------------------------------------------------------------------------
# check_calls
# --------------------------------------------------------------------------------------------

PARIS = exp("get_current_weather", city={"contains": "paris"})
TOKYO = exp("get_current_weather", city={"contains": "tokyo"})


@pytest.mark.parametrize("level", ["semantic", "structural"])
def test_calls_single_good(level):
    assert check_calls([call("get_current_weather", {"city": "Paris"})], TOOLS, [PARIS], level) == []


@pytest.mark.parametrize("order", [("Paris", "Tokyo"), ("Tokyo", "Paris")])
def test_calls_parallel_order_insensitive(order):
    calls = [call("get_current_weather", {"city": c}) for c in order]
    assert check_calls(calls, TOOLS, [PARIS, TOKYO], "semantic") == []


def test_calls_parallel_different_functions_order_insensitive():
    calls = [call("get_time", ""), call("get_current_weather", {"city": "Paris"})]
    assert check_calls(calls, TOOLS, [PARIS, exp("get_time")], "semantic") == []


def test_calls_parallel_same_value_twice_does_not_match_both():
    calls = [call("get_current_weather", {"city": "Paris"}), call("get_current_weather", {"city": "Paris"})]
    problems = check_calls(calls, TOOLS, [PARIS, TOKYO], "semantic")
    assert _has_all(problems, "city", "Paris", "tokyo"), problems


def test_calls_too_few():
    problems = check_calls([call("get_current_weather", {"city": "Paris"})], TOOLS, [PARIS, TOKYO], "semantic")
    assert _has_all(problems, "expected 2", "got 1"), problems
    assert _has_all(problems, "get_current_weather", "tokyo"), problems  # names the expected call left unmatched


def test_calls_too_many():
    calls = [call("get_current_weather", {"city": "Paris"}), call("get_current_weather", {"city": "Tokyo"})]
    problems = check_calls(calls, TOOLS, [PARIS], "semantic")
    assert _has_all(problems, "expected 1", "got 2"), problems


def test_calls_none_when_one_expected():
    problems = check_calls([], TOOLS, [PARIS], "semantic")
    assert _has_all(problems, "get_current_weather", "got none"), problems


@pytest.mark.parametrize("level", ["semantic", "structural"])
def test_calls_one_when_none_expected(level):
    problems = check_calls([call("get_current_weather", {"city": "Paris"})], TOOLS, [], level)
    assert _has_all(problems, "no tool call expected", "get_current_weather"), problems


@pytest.mark.parametrize("level", ["semantic", "structural"])
def test_calls_none_when_none_expected(level):
    assert check_calls([], TOOLS, [], level) == []


def test_calls_semantic_wrong_value():
    problems = check_calls([call("get_current_weather", {"city": "Berlin"})], TOOLS, [PARIS], "semantic")
    assert _has_all(problems, "get_current_weather", "city", "Berlin"), problems


def test_calls_semantic_wrong_function_offered():
    calls = [call("get_time", "")]
    problems = check_calls(calls, TOOLS, [PARIS], "semantic")
    assert _has_all(problems, "get_time", "get_current_weather"), problems


def test_calls_structural_ignores_wrong_values():
    calls = [call("get_current_weather", {"city": "Berlin"})]
    assert check_calls(calls, TOOLS, [PARIS], "structural") == []


@pytest.mark.parametrize(("args", "facts"), [
    ({"city": 7}, ("city", "7", "string")),
    ({"city": "Paris", "unit": "kelvin"}, ("unit", "kelvin")),
    ({"city": "Paris", "zip": "75001"}, ("unknown argument", "zip")),
    ({}, ("missing required", "city")),
    ("{oops", ("not valid JSON",)),
])
def test_calls_structural_still_catches_schema_errors(args, facts):
    problems = check_calls([call("get_current_weather", args)], TOOLS, [PARIS], "structural")
    assert _has_all(problems, "get_current_weather", *facts), problems


def test_calls_structural_unknown_function():
    problems = check_calls([call("get_weather", {"city": "Paris"})], TOOLS, [PARIS], "structural")
    assert _has_all(problems, "get_weather", "unknown function"), problems


def test_calls_structure_checked_only_against_offered_tools():
    offered = {"get_time": TOOLS["get_time"]}
    problems = check_calls([call("get_current_weather", {"city": "Paris"})], offered, [PARIS], "semantic")
    assert _has_all(problems, "get_current_weather", "unknown function"), problems


def test_calls_semantic_schema_error_reported_before_values():
    calls = [call("get_current_weather", {"city": "Paris"}), call("get_current_weather", {"city": "Tokyo", "bogus": 1})]
    problems = check_calls(calls, TOOLS, [PARIS, TOKYO], "semantic")
    assert _has_all(problems, "unknown argument", "bogus"), problems


def test_calls_unicode_semantic():
    calls = [call("get_current_weather", {"city": "São Paulo"}), call("get_current_weather", {"city": "東京"})]
    expected = [exp("get_current_weather", city={"contains": "东京"}), exp("get_current_weather", city="SÃO PAULO")]
    # 东 (simplified) is not 東 (traditional): the first expected call must not match
    problems = check_calls(calls, TOOLS, expected, "semantic")
    assert _has_all(problems, "city", "东京"), problems
    expected[0] = exp("get_current_weather", city={"contains": "東京"})
    assert check_calls(calls, TOOLS, expected, "semantic") == []


def test_calls_matching_is_not_greedy():
    calls = [call("get_current_weather", {"city": "Paris"}), call("get_current_weather", {"city": "Tokyo"})]
    loose = exp("get_current_weather", city={"any": True})
    assert check_calls(calls, TOOLS, [loose, PARIS], "semantic") == []


def test_semantics_any_false_does_not_crash():
    check_semantics(call("get_current_weather", {"city": "Paris"}), exp("get_current_weather", city={"any": False}))


# --------------------------------------------------------------------------------------------
# Agreement with BFCL's checker (tests/test_bfcl_agreement.py runs BFCL's own as the oracle)
# --------------------------------------------------------------------------------------------

FREE_FORM = {"set_grades": {"parameters": {"type": "object", "properties": {
    "grades": {"type": "object", "description": "subject -> score"},
    "meta": {"type": "object", "properties": {"term": {"type": "string"}}}}, "required": ["grades"]}}}


def test_free_form_object_accepts_any_keys():
    assert check_structure(call("set_grades", {"grades": {"math": 90, "art": 75}}), FREE_FORM) == []
    assert check_calls([call("set_grades", {"grades": {"math": 90}})], FREE_FORM,
                       [exp("set_grades", grades={"exactly": {"math": 90}})], "semantic") == []


def test_object_with_properties_still_refuses_unknown_keys():
    problems = check_structure(call("set_grades", {"grades": {}, "meta": {"term": "fall", "year": 2024}}), FREE_FORM)
    assert _has_all(problems, "unknown argument", "meta", "year"), problems


@pytest.mark.parametrize(("value", "ok"), [(5, True), (5.0, False), (True, False), ("5", False)])
def test_integer_means_an_integer_literal(value, ok):
    assert (check_structure(call("get_current_weather", {"city": "Paris", "days": value}), TOOLS) == []) is ok


OPTIONAL_UNIT = exp("get_current_weather", city="Paris", unit={"optional": "celsius"})


@pytest.mark.parametrize(("args", "ok"), [
    ({"city": "Paris"}, True),
    ({"city": "Paris", "unit": "celsius"}, True),
    ({"city": "Paris", "unit": "Celsius"}, True),
    ({"city": "Paris", "unit": "fahrenheit"}, False),
])
def test_optional_argument_absent_or_equal(args, ok):
    assert (check_semantics(call("get_current_weather", args), OPTIONAL_UNIT) == []) is ok


def test_absent_argument():
    e = exp("get_current_weather", city="Paris", days={"absent": True})
    assert check_semantics(call("get_current_weather", {"city": "Paris"}), e) == []
    problems = check_semantics(call("get_current_weather", {"city": "Paris", "days": 2}), e)
    assert _has_all(problems, "days", "left out"), problems


def test_one_of_with_absent_and_nested_optional_keys():
    e = exp("ship_parcel", address={"exactly": {"street": "1 Main St", "city": "Oslo", "zip": {"optional": "0150"}}},
            options={"one_of": [{"absent": True}, ["fragile"]]})
    ok = [{"address": {"street": "1 main st.", "city": "OSLO"}}, {"address": {"street": "1 Main St", "city": "Oslo"}, "options": ["fragile"]}]
    bad = [{"address": {"street": "1 Main St", "city": "Oslo"}, "options": ["express"]},
           {"address": {"street": "1 Main St"}}]
    for args in ok:
        assert check_semantics(call("ship_parcel", args), e) == [], args
    for args in bad:
        assert check_semantics(call("ship_parcel", args), e), args


@pytest.mark.parametrize(("want", "got", "ok"), [
    ("April 1, 2024", "april 1 2024", True),
    ("New York", "new-york", True),
    ("New York", "NewYork.", True),
    ("Rock 'n' Roll", 'rock "n" roll', True),
    ("a_b*c^d/e", "ABCDE", True),
    ("São Paulo", "SÃO-PAULO", True),
    ("Straße", "STRASSE", False),  # lower-cased, as BFCL does, not case-folded
    ("New York", "New\tYork", False),  # spaces only, as BFCL does
    ("April 1, 2024", "April 2, 2024", False),
    ("New York", "New York;", False),
])
def test_strings_compare_normalised_like_bfcl(want, got, ok):
    assert (check_semantics(call("get_current_weather", {"city": got}), exp("get_current_weather", city=want)) == []) is ok


def test_empty_string_for_an_optional_string_is_no_value():
    # BFCL's convention: "" marks "not given"; so it is not held to the enum either
    assert check_structure(call("get_current_weather", {"city": "Paris", "unit": ""}), TOOLS) == []
    assert check_semantics(call("get_current_weather", {"city": "Paris", "unit": ""}), OPTIONAL_UNIT) == []
    assert check_semantics(call("get_current_weather", {"city": "Paris", "unit": ""}), exp("get_current_weather", unit="celsius"))
    assert check_structure(call("get_current_weather", {"city": "", "unit": "celsius"}), TOOLS) == []  # required: a value
    assert check_structure(call("get_current_weather", {"city": "Paris", "days": ""}), TOOLS)  # not a string parameter


@pytest.mark.parametrize("arguments", [
    {"city": {"contains": "x", "one_of": ["y"]}},
    {"city": {"one_of": "paris"}},
    {"city": {"exactly": ["x"]}},
    {"city": {"absent": False}},
    {"city": {"optional": {"one_of": "x"}}},
])
def test_malformed_constraints_refused(arguments):
    with pytest.raises(ValueError):
        ExpectedCall(name="get_current_weather", arguments=arguments)


# --------------------------------------------------------------------------------------------
# load_suite
# --------------------------------------------------------------------------------------------

def _case(id_: str, **kw) -> dict:
    base = {
        "id": id_, "category": "simple", "tools": ["get_current_weather"],
        "messages": [{"role": "user", "content": "weather in Rome?"}],
        "expected": [{"name": "get_current_weather", "arguments": {"city": {"contains": "rome"}}}],
    }
    return {**base, **kw}


def test_default_suite_loads():
    suite = S.load_suite()
    assert len(suite.cases) >= 8
    assert {c.category for c in suite.cases} == set(S.CATEGORIES)
    for case in suite.cases:
        assert set(case.tools) <= set(suite.tools)
        for e in case.expected:
            assert e.name in case.tools, f"{case.id} expects {e.name} which it does not offer"


def test_extra_cases_merge():
    base = S.load_suite()
    extra = {
        "tools": {"get_time": TOOLS["get_time"]},
        "cases": [_case("extra-rome"), _case("extra-time", tools=["get_time"], expected=[{"name": "get_time"}])],
    }
    suite = S.load_suite(extra)
    ids = [c.id for c in suite.cases]
    assert len(ids) == len(base.cases) + 2
    assert {"extra-rome", "extra-time"} <= set(ids)
    assert "get_time" in suite.tools and set(base.tools) <= set(suite.tools)
    assert S.load_suite({"cases": [_case("only-case")]}).cases[-1].id == "only-case"


def test_extra_case_unknown_tool_refused():
    with pytest.raises(PipelineInputError, match="teleport"):
        S.load_suite({"cases": [_case("bad", tools=["teleport"], expected=[{"name": "teleport"}])]})


def test_extra_case_expecting_unknown_tool_refused():
    with pytest.raises(PipelineInputError, match="teleport"):
        S.load_suite({"cases": [_case("bad", expected=[{"name": "teleport"}])]})


@pytest.mark.parametrize("modes", [["auto", "required"], ["named"], ["auto", "required", "named", "none"]])
def test_no_expected_with_forcing_mode_refused(modes):
    with pytest.raises(PipelineInputError, match="force"):
        S.load_suite({"cases": [_case("nocall", expected=[], modes=modes)]})


def test_no_expected_with_auto_none_accepted():
    suite = S.load_suite({"cases": [_case("nocall", category="irrelevance", expected=[], modes=["auto", "none"])]})
    assert suite.cases[-1].expected == []


def test_duplicate_ids_refused():
    with pytest.raises(PipelineInputError, match="unique"):
        S.load_suite({"cases": [_case("dup"), _case("dup")]})
    with pytest.raises(PipelineInputError, match="unique"):
        S.load_suite({"cases": [_case("weather-paris")]})


def test_bad_category_refused():
    with pytest.raises(PipelineInputError):
        S.load_suite({"cases": [_case("badcat", category="acrobatics")]})


# --------------------------------------------------------------------------------------------
# load_gate / Gate.threshold
# --------------------------------------------------------------------------------------------

def test_smollm2_gate_by_served_name():
    gate = S.load_gate("smollm2-135m-instruct")
    assert gate.level == "semantic"
    assert gate.threshold("simple", "required") == 0.5  # several cases per cell, a pass rate with margin
    assert gate.threshold("multiple", "required") == 0.4
    assert gate.threshold("streaming", "required") == 0.33
    assert gate.threshold("streaming", "named") == 0.33
    assert gate.threshold("irrelevance", "none") == 1.0
    assert gate.threshold("simple", "auto") is None
    assert not gate.requires("parallel", "auto")
    assert gate.requires("multiple", "named")


def test_smollm2_gate_by_name_matches_served_name():
    assert S.load_gate("anything", "smollm2-135m-instruct") == S.load_gate("smollm2-135m-instruct")


def test_unknown_served_name_falls_back_to_default():
    gate = S.load_gate("acme/some-model-7b")
    assert gate.min_pass_rate == 1.0
    for category in S.CATEGORIES:
        for mode in ("auto", "required", "named", "none"):
            assert gate.threshold(category, mode) == 1.0


def test_gate_by_file_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("level: structural\nmin_pass_rate: 0.75\nrequired_cells:\n  - {category: simple, mode: auto}\n")
    gate = S.load_gate("whatever", str(p))
    assert gate.level == "structural" and gate.threshold("simple", "auto") == 0.75


def test_dict_gate():
    gate = S.load_gate("smollm2-135m-instruct", {"level": "structural", "min_pass_rate": 0.8,
                                                  "required_cells": [{"category": "parallel", "mode": "*"}]})
    assert gate.level == "structural"
    assert gate.threshold("parallel", "auto") == 0.8
    assert gate.threshold("simple", "required") is None


@pytest.mark.parametrize("name", ["no-such-gate", "missing.yaml"])
def test_unknown_gate_name_raises(name):
    with pytest.raises(PipelineInputError, match="not found"):
        S.load_gate("smollm2-135m-instruct", name)


def test_threshold_per_cell_override_and_wildcards():
    gate = S.Gate(min_pass_rate=0.9, required_cells=[
        S.Cell(category="streaming", mode="*", min_pass_rate=0.5),
        S.Cell(category="*", mode="required"),
        S.Cell(category="multi_*", mode="auto", min_pass_rate=0.0),
    ])
    assert gate.threshold("streaming", "required") == 0.5  # first match wins
    assert gate.threshold("streaming", "auto") == 0.5
    assert gate.threshold("simple", "required") == 0.9  # the gate's own rate
    assert gate.threshold("multi_turn", "auto") == 0.0  # 0.0 is a threshold, not "ungated"
    assert gate.requires("multi_turn", "auto")
    assert gate.threshold("simple", "auto") is None
    assert gate.threshold("multi_turn", "none") is None


def test_gate_without_cells_gates_nothing():
    gate = S.Gate()
    assert gate.threshold("simple", "required") is None


# --------------------------------------------------------------------------------------------
# matrix / gate_failures
# --------------------------------------------------------------------------------------------

def R(case: str, category: str, mode: str, passed: bool) -> S.CaseResult:
    return S.CaseResult(case=case, category=category, mode=mode, passed=passed, reason="" if passed else "nope")


RESULTS = [
    R("a", "simple", "required", True),
    R("b", "simple", "required", False),
    R("c", "simple", "required", False),
    R("a", "simple", "auto", False),
    R("b", "simple", "auto", False),
    R("s1", "streaming", "required", True),
    R("s2", "streaming", "required", False),
    R("n1", "irrelevance", "none", True),
]


def test_matrix_counts():
    m = S.matrix(RESULTS)
    assert m == {
        ("simple", "required"): (1, 3),
        ("simple", "auto"): (0, 2),
        ("streaming", "required"): (1, 2),
        ("irrelevance", "none"): (1, 1),
    }
    assert S.matrix([]) == {}


def test_gate_failures_reports_gated_cell_with_failed_cases():
    gate = S.Gate(min_pass_rate=1.0, required_cells=[
        S.Cell(category="simple", mode="required"),
        S.Cell(category="streaming", mode="required", min_pass_rate=0.5),
        S.Cell(category="*", mode="none"),
    ])
    failures = S.gate_failures(RESULTS, gate)
    assert len(failures) == 1, failures
    f = failures[0]
    assert "simple" in f and "required" in f and "1/3" in f
    assert "b" in f.split("failed:")[1] and "c" in f.split("failed:")[1]
    assert "a" not in f.split("failed:")[1]


def test_gate_failures_ungated_cell_ignored():
    gate = S.Gate(required_cells=[S.Cell(category="irrelevance", mode="*")])
    assert S.gate_failures(RESULTS, gate) == []  # simple x auto is 0/2 but not gated


def test_gate_failures_exactly_at_threshold_passes():
    gate = S.Gate(required_cells=[S.Cell(category="streaming", mode="required", min_pass_rate=0.5)])
    assert S.gate_failures(RESULTS, gate) == []
    gate = S.Gate(required_cells=[S.Cell(category="simple", mode="required", min_pass_rate=1 / 3)])
    assert S.gate_failures(RESULTS, gate) == []
    gate = S.Gate(required_cells=[S.Cell(category="streaming", mode="required", min_pass_rate=0.51)])
    failures = S.gate_failures(RESULTS, gate)
    assert len(failures) == 1 and "s2" in failures[0] and "1/2" in failures[0]


def test_gate_failures_default_gate_flags_every_failing_cell():
    failures = S.gate_failures(RESULTS, S.load_gate("unknown-model"))
    cells = sorted(f.split(":")[0] for f in failures)
    assert cells == ["simple x auto", "simple x required", "streaming x required"]


def test_gate_failures_smollm2_gate():
    failures = S.gate_failures(RESULTS, S.load_gate("smollm2-135m-instruct"))
    assert len(failures) == 1 and failures[0].startswith("simple x required")
