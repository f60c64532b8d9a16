"""Make agreement_cases.jsonl: the judged tool calls of tests/test_bfcl_agreement.py.

Each line is one BFCL question (its function docs and possible answer, in BFCL's formats) with
several model outputs to judge ([{function: {arg: value}}], the decoded form BFCL's checker
takes). Two sources:
- a fixed-seed sample of BFCL's own questions (the bfcl-eval package in .venv-bfcl), each judged
  with a right answer and mutations of it: wrong value, wrong type, 5.0 for an integer, a
  string written differently, missing required, unknown or unanswered argument, optional
  argument left out or given, null, wrong function, calls dropped, duplicated or reordered;
- hand-written edge cases (HANDWRITTEN): free-form dicts, optional arguments, nested dicts,
  lists of dicts, tuples, int/float, normalisation limits, parallel matching.
Deterministic: `.venv/bin/python tests/data/bfcl/make_agreement_cases.py` rewrites the same file.
"""

from __future__ import annotations

import copy
import glob
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
OUT = HERE / "agreement_cases.jsonl"
SAMPLE = {"simple_python": 30, "multiple": 16, "parallel": 14, "parallel_multiple": 10, "live_simple": 16,
          "live_multiple": 10, "live_parallel": 4, "live_parallel_multiple": 4}
# Questions with free-form dicts, tuples, `any`, dict and list-of-dict answers, None in answers.
FORCED = ["simple_python_0", "simple_python_83", "simple_python_109", "simple_python_337", "multiple_9", "parallel_29",
          "parallel_multiple_66", "live_simple_117-73-0"]
MAX_DOC_CHARS = 3000
MUTATIONS_PER_QUESTION = 3


def tname(name: str) -> str:
    return name.replace(".", "_")


def is_blank(v) -> bool:
    return isinstance(v, str) and v == ""


# --------------------------------------------------------------------------------------------
# Right answers from a ground truth
# --------------------------------------------------------------------------------------------

def build(value, schema: dict | None):
    """A concrete value from one accepted value of a possible answer."""
    kind = (schema or {}).get("type")
    if kind == "dict" and isinstance(value, dict):
        out = {}
        for k, alts in value.items():
            non = [a for a in alts if not is_blank(a)] if isinstance(alts, list) else [alts]
            if non and not ("" in alts and len(k) % 2):  # leave some optional keys out, deterministically
                out[k] = copy.deepcopy(non[0])
        return out
    if kind in ("array", "tuple") and ((schema or {}).get("items") or {}).get("type") == "dict" and isinstance(value, list):
        return [build(v, {"type": "dict"}) for v in value]
    return copy.deepcopy(value)


def right_call(item: dict, docs: dict, rng: random.Random, optional: str = "random") -> dict:
    (fname, params), = item.items()
    props = docs[fname]["parameters"].get("properties", {})
    args = {}
    for p, alts in params.items():
        non = [a for a in alts if not is_blank(a)]
        if not non:
            continue
        if "" in alts and (optional == "omit" or (optional == "random" and rng.random() < 0.4)):
            continue
        args[p] = build(rng.choice(non), props.get(p))
    return {tname(fname): args}


# --------------------------------------------------------------------------------------------
# Mutations: each takes (output, question) and returns a new output or None when it does not apply
# --------------------------------------------------------------------------------------------

def _args(out):  # the (name, args) of each call
    return [next(iter(c.items())) for c in out]


def _props(q, name):
    for f in q["function"]:
        if tname(f["name"]) == name:
            return f["parameters"].get("properties", {}), f["parameters"].get("required", [])
    return {}, []


def _answer_params(q, name):
    for item in q["ground_truth"]:
        (fname, params), = item.items()
        if tname(fname) == name:
            return params
    return {}


def _edit(out, rng, pred, change):
    """Apply `change(args, key, props)` to one (random) argument meeting `pred(value, schema)`."""
    spots = [(i, k) for i, (n, a) in enumerate(_args(out)) for k, v in a.items()
             if pred(v, _props(Q, n)[0].get(k, {}))]
    if not spots:
        return None
    i, k = rng.choice(spots)
    new = copy.deepcopy(out)
    (name, args), = new[i].items()
    change(args, k, _props(Q, name)[0].get(k, {}))
    return new


def m_string_normalised(out, rng):
    styles = [str.upper, lambda s: s.replace(" ", "-"), lambda s: s.title() + ".", lambda s: s.replace(" ", ""),
              lambda s: s.replace(",", " ,").lower()]
    style = rng.choice(styles)
    return _edit(out, rng, lambda v, s: isinstance(v, str) and v.strip() and s.get("type") == "string" and "enum" not in s,
                 lambda a, k, s: a.__setitem__(k, style(a[k])))


def m_string_wrong(out, rng):
    return _edit(out, rng, lambda v, s: isinstance(v, str) and s.get("type") == "string",
                 lambda a, k, s: a.__setitem__(k, a[k] + " zq"))


def m_int_as_float(out, rng):
    return _edit(out, rng, lambda v, s: type(v) is int and s.get("type") == "integer",
                 lambda a, k, s: a.__setitem__(k, float(a[k])))


def m_float_as_int(out, rng):
    return _edit(out, rng, lambda v, s: type(v) is float and v.is_integer() and s.get("type") == "float",
                 lambda a, k, s: a.__setitem__(k, int(a[k])))


def m_number_as_string(out, rng):
    return _edit(out, rng, lambda v, s: type(v) in (int, float), lambda a, k, s: a.__setitem__(k, str(a[k])))


def m_number_off(out, rng):
    return _edit(out, rng, lambda v, s: type(v) in (int, float), lambda a, k, s: a.__setitem__(k, a[k] + 1))


def m_bool_flip(out, rng):
    return _edit(out, rng, lambda v, s: type(v) is bool, lambda a, k, s: a.__setitem__(k, not a[k]))


def m_bool_for_int(out, rng):
    return _edit(out, rng, lambda v, s: type(v) is int and v in (0, 1), lambda a, k, s: a.__setitem__(k, bool(a[k])))


def m_list_reversed(out, rng):
    return _edit(out, rng, lambda v, s: isinstance(v, list) and len(v) > 1 and v != v[::-1],
                 lambda a, k, s: a.__setitem__(k, a[k][::-1]))


def m_list_element_wrong(out, rng):
    return _edit(out, rng, lambda v, s: isinstance(v, list) and v and isinstance(v[0], (str, int, float)) and not isinstance(v[0], bool),
                 lambda a, k, s: a[k].__setitem__(0, a[k][0] + (" zq" if isinstance(a[k][0], str) else 7)))


def m_dict_extra_key(out, rng):
    return _edit(out, rng, lambda v, s: isinstance(v, dict), lambda a, k, s: a[k].__setitem__("zq_extra", 1))


def m_dict_drop_key(out, rng):
    return _edit(out, rng, lambda v, s: isinstance(v, dict) and v, lambda a, k, s: a[k].pop(sorted(a[k])[0]))


def _drop_arg(out, rng, required: bool):
    """Drop one argument the function requires (or, with required=False, one it does not)."""
    spots = [(i, k) for i, (n, a) in enumerate(_args(out)) for k in a if (k in _props(Q, n)[1]) == required]
    if not spots:
        return None
    i, k = rng.choice(spots)
    new = copy.deepcopy(out)
    next(iter(new[i].values())).pop(k)
    return new


def m_missing_required(out, rng):
    return _drop_arg(out, rng, required=True)


def m_drop_optional(out, rng):
    return _drop_arg(out, rng, required=False)


def m_unknown_arg(out, rng):
    new = copy.deepcopy(out)
    next(iter(rng.choice(new).values()))["zq_unknown"] = "x"
    return new


def _sample_value(schema):
    return {"integer": 3, "float": 2.5, "boolean": True, "array": [], "tuple": [], "dict": {}}.get(schema.get("type"), "zq")


def m_unanswered_arg(out, rng):
    """A parameter the function has but the possible answer does not name."""
    spots = [(i, p, s) for i, (n, a) in enumerate(_args(out)) for p, s in _props(Q, n)[0].items()
             if p not in a and p not in _answer_params(Q, n)]
    if not spots:
        return None
    i, p, s = rng.choice(spots)
    new = copy.deepcopy(out)
    next(iter(new[i].values()))[p] = s.get("enum", [None])[0] if s.get("enum") else _sample_value(s)
    return new


def m_null_optional(out, rng):
    spots = [(i, p) for i, (n, a) in enumerate(_args(out)) for p, alts in _answer_params(Q, n).items() if "" in alts]
    if not spots:
        return None
    i, p = rng.choice(spots)
    new = copy.deepcopy(out)
    next(iter(new[i].values()))[p] = None
    return new


def m_empty_optional(out, rng):
    spots = [(i, p) for i, (n, a) in enumerate(_args(out)) for p, alts in _answer_params(Q, n).items()
             if "" in alts and _props(Q, n)[0].get(p, {}).get("type") in ("string", "array")]
    if not spots:
        return None
    i, p = rng.choice(spots)
    new = copy.deepcopy(out)
    name = next(iter(new[i]))
    new[i][name][p] = "" if _props(Q, name)[0][p]["type"] == "string" else []
    return new


def m_wrong_function(out, rng):
    names = [tname(f["name"]) for f in Q["function"]]
    i = rng.randrange(len(out))
    (name, args), = out[i].items()
    others = [n for n in names if n != name]
    if not others:
        return None
    new = copy.deepcopy(out)
    new[i] = {rng.choice(others): args}
    return new


def m_no_call(out, rng):
    return []


def m_extra_call(out, rng):
    return copy.deepcopy(out) + [copy.deepcopy(rng.choice(out))]


def m_drop_call(out, rng):
    return copy.deepcopy(out[:-1]) if len(out) > 1 else None


def m_reversed_calls(out, rng):
    return copy.deepcopy(out[::-1]) if len(out) > 1 and out != out[::-1] else None


def m_duplicate_call(out, rng):
    return copy.deepcopy([out[0], out[0]] + out[2:]) if len(out) > 1 and out[0] != out[1] else None


MUTATIONS = {name[2:]: fn for name, fn in globals().items() if name.startswith("m_")}
Q: dict = {}


# --------------------------------------------------------------------------------------------
# Hand-written edge cases
# --------------------------------------------------------------------------------------------

def _fn(name, properties, required=()):
    return {"name": name, "description": f"{name} (hand-written)", "parameters": {
        "type": "dict", "properties": properties, "required": list(required)}}


S = {"type": "string", "description": "."}
HANDWRITTEN = [
    {"id": "hw_freeform_dict", "category": "simple", "function": [_fn("report.set_grades", {
        "student": S, "grades": {"type": "dict", "description": "subject -> score"}}, ["student", "grades"])],
     "ground_truth": [{"report.set_grades": {"student": ["Ann"], "grades": [{"math": [90], "art": [75, ""]}]}}],
     "outputs": {"right": [{"report_set_grades": {"student": "Ann", "grades": {"math": 90, "art": 75}}}],
                 "right-optional-key-left-out": [{"report_set_grades": {"student": "Ann", "grades": {"math": 90}}}],
                 "wrong-extra-key": [{"report_set_grades": {"student": "Ann", "grades": {"math": 90, "gym": 60}}}],
                 "wrong-value": [{"report_set_grades": {"student": "Ann", "grades": {"math": 91}}}],
                 "wrong-missing-key": [{"report_set_grades": {"student": "Ann", "grades": {"art": 75}}}],
                 "wrong-not-a-dict": [{"report_set_grades": {"student": "Ann", "grades": "math: 90"}}]}},
    {"id": "hw_freeform_dict_two_answers", "category": "simple", "function": [_fn("config.update", {
        "settings": {"type": "dict", "description": "key -> value"}}, ["settings"])],
     "ground_truth": [{"config.update": {"settings": [{"theme": ["dark"]}, {"mode": ["dark"]}]}}],
     "outputs": {"right-first": [{"config_update": {"settings": {"theme": "Dark"}}}],
                 "right-second": [{"config_update": {"settings": {"mode": "dark"}}}],
                 "wrong-mixed": [{"config_update": {"settings": {"theme": "dark", "mode": "dark"}}}],
                 "wrong-empty": [{"config_update": {"settings": {}}}]}},
    {"id": "hw_optional_absent_or_x", "category": "simple", "function": [_fn("get_weather", {
        "city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "."},
        "days": {"type": "integer", "description": "."}}, ["city"])],
     "ground_truth": [{"get_weather": {"city": ["Paris", "Paris, France"], "unit": ["celsius", ""], "days": [1, ""]}}],
     "outputs": {"right-absent": [{"get_weather": {"city": "Paris"}}],
                 "right-given": [{"get_weather": {"city": "paris, france", "unit": "celsius", "days": 1}}],
                 "right-empty-string": [{"get_weather": {"city": "Paris", "unit": ""}}],
                 "wrong-other-enum": [{"get_weather": {"city": "Paris", "unit": "fahrenheit"}}],
                 "wrong-days": [{"get_weather": {"city": "Paris", "days": 3}}],
                 "wrong-days-5.0": [{"get_weather": {"city": "Paris", "days": 1.0}}],
                 "wrong-null": [{"get_weather": {"city": "Paris", "days": None}}],
                 "wrong-city": [{"get_weather": {"city": "Lyon"}}]}},
    {"id": "hw_optional_must_be_given", "category": "simple", "function": [_fn("book", {
        "room": S, "nights": {"type": "integer", "description": "."}}, ["room"])],
     "ground_truth": [{"book": {"room": ["double"], "nights": [2]}}],
     "outputs": {"right": [{"book": {"room": "double", "nights": 2}}],
                 "wrong-optional-left-out": [{"book": {"room": "double"}}]}},
    {"id": "hw_unanswered_param", "category": "simple", "function": [_fn("search", {
        "query": S, "limit": {"type": "integer", "description": "."}}, ["query"])],
     "ground_truth": [{"search": {"query": ["vllm"]}}],
     "outputs": {"right": [{"search": {"query": "vLLM"}}],
                 "wrong-unanswered-param-given": [{"search": {"query": "vllm", "limit": 10}}]}},
    {"id": "hw_nested_dict", "category": "simple", "function": [_fn("ship", {
        "address": {"type": "dict", "description": ".", "properties": {
            "street": S, "city": S, "zip": {"type": "string", "description": "."}}, "required": ["street", "city"]},
        "express": {"type": "boolean", "description": "."}}, ["address"])],
     "ground_truth": [{"ship": {"address": [{"street": ["1 Main St", "1 Main Street"], "city": ["Oslo"], "zip": ["0150", ""]}],
                                "express": [False, ""]}}],
     "outputs": {"right": [{"ship": {"address": {"street": "1 main st.", "city": "OSLO"}}}],
                 "right-with-zip": [{"ship": {"address": {"street": "1 Main Street", "city": "Oslo", "zip": "0150"}, "express": False}}],
                 "wrong-zip": [{"ship": {"address": {"street": "1 Main St", "city": "Oslo", "zip": "0151"}}}],
                 "wrong-express": [{"ship": {"address": {"street": "1 Main St", "city": "Oslo"}, "express": True}}],
                 "wrong-unknown-key": [{"ship": {"address": {"street": "1 Main St", "city": "Oslo", "country": "NO"}}}]}},
    {"id": "hw_list_of_dicts", "category": "simple", "function": [_fn("order", {
        "items": {"type": "array", "description": ".", "items": {"type": "dict", "properties": {
            "sku": S, "qty": {"type": "integer", "description": "."}}}}}, ["items"])],
     "ground_truth": [{"order": {"items": [[{"sku": ["A1"], "qty": [2]}, {"sku": ["B2"], "qty": [1, ""]}]]}}],
     "outputs": {"right": [{"order": {"items": [{"sku": "A1", "qty": 2}, {"sku": "b2"}]}}],
                 "right-qty-given": [{"order": {"items": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 1}]}}],
                 "wrong-order": [{"order": {"items": [{"sku": "B2"}, {"sku": "A1", "qty": 2}]}}],
                 "wrong-count": [{"order": {"items": [{"sku": "A1", "qty": 2}]}}],
                 "wrong-qty": [{"order": {"items": [{"sku": "A1", "qty": 3}, {"sku": "B2"}]}}]}},
    {"id": "hw_types", "category": "simple", "function": [_fn("calc", {
        "n": {"type": "integer", "description": "."}, "x": {"type": "float", "description": "."},
        "flag": {"type": "boolean", "description": "."}, "point": {"type": "tuple", "items": {"type": "float"}, "description": "."},
        "names": {"type": "array", "items": {"type": "string"}, "description": "."}, "data": {"type": "any", "description": "."}},
        ["n", "x"])],
     "ground_truth": [{"calc": {"n": [5], "x": [2.0], "flag": [True, ""], "point": [[1.5, 2.5], ""], "names": [["a b", "c"], ""],
                                "data": ["dataset.csv", ""]}}],
     "outputs": {"right": [{"calc": {"n": 5, "x": 2.0}}],
                 "right-int-for-float": [{"calc": {"n": 5, "x": 2}}],
                 "right-all": [{"calc": {"n": 5, "x": 2.0, "flag": True, "point": [1.5, 2.5], "names": ["A-B", "C"], "data": "Dataset.CSV"}}],
                 "right-empty-list-for-optional": [{"calc": {"n": 5, "x": 2.0, "names": []}}],
                 "wrong-5.0-for-integer": [{"calc": {"n": 5.0, "x": 2.0}}],
                 "wrong-string-for-integer": [{"calc": {"n": "5", "x": 2.0}}],
                 "wrong-bool-for-integer": [{"calc": {"n": True, "x": 2.0}}],
                 "wrong-int-for-bool": [{"calc": {"n": 5, "x": 2.0, "flag": 1}}],
                 "wrong-list-order": [{"calc": {"n": 5, "x": 2.0, "names": ["c", "a b"]}}],
                 "wrong-tuple-value": [{"calc": {"n": 5, "x": 2.0, "point": [2.5, 1.5]}}],
                 "wrong-string-for-list": [{"calc": {"n": 5, "x": 2.0, "names": "a b, c"}}],
                 "wrong-number-for-any": [{"calc": {"n": 5, "x": 2.0, "data": 7}}]}},
    {"id": "hw_string_normalisation", "category": "simple", "function": [_fn("find_event", {
        "date": S, "title": S}, ["date", "title"])],
     "ground_truth": [{"find_event": {"date": ["April 1, 2024"], "title": ["Rock 'n' Roll"]}}],
     "outputs": {"right": [{"find_event": {"date": "april 1 2024", "title": "ROCK \"N\" ROLL"}}],
                 "right-punctuation": [{"find_event": {"date": "April-1,2024.", "title": "rock_'n'_roll"}}],
                 "wrong-digits": [{"find_event": {"date": "April 2, 2024", "title": "Rock 'n' Roll"}}],
                 "wrong-other-punctuation": [{"find_event": {"date": "April 1; 2024", "title": "Rock 'n' Roll"}}]}},
    # Where BFCL's normalisation stops (lower-casing, not case folding; spaces, not all whitespace).
    {"id": "hw_unicode_whitespace", "category": "simple", "function": [_fn("lookup", {"street": S}, ["street"])],
     "ground_truth": [{"lookup": {"street": ["Hauptstraße 5"]}}],
     "outputs": {"right-lower-case": [{"lookup": {"street": "hauptstraße 5"}}],
                 "wrong-case-folded": [{"lookup": {"street": "HAUPTSTRASSE 5"}}],
                 "wrong-tab-for-space": [{"lookup": {"street": "Hauptstraße\t5"}}]}},
    # Deliberate differences (docs/validation-bfcl.md): these disagree with BFCL on purpose.
    {"id": "hw_int_in_float_array", "category": "simple", "function": [_fn("mean", {
        "values": {"type": "array", "items": {"type": "float"}, "description": "."}}, ["values"])],
     "ground_truth": [{"mean": {"values": [[1.0, 2.5, 4.0]]}}],
     "outputs": {"right": [{"mean": {"values": [1.0, 2.5, 4.0]}}],
                 "right-ints": [{"mean": {"values": [1, 2.5, 4]}}],
                 "wrong-value": [{"mean": {"values": [1, 2.5, 5]}}]}},
    {"id": "hw_null_where_answer_lists_none", "category": "simple", "function": [_fn("convert", {
        "amount": {"type": "float", "description": "."}, "rate": {"type": "float", "description": "."}}, ["amount"])],
     "ground_truth": [{"convert": {"amount": [10.0], "rate": [None, ""]}}],
     "outputs": {"right": [{"convert": {"amount": 10}}],
                 "null-for-typed-param": [{"convert": {"amount": 10, "rate": None}}]}},
    {"id": "hw_parallel_matching", "category": "parallel", "function": [_fn("get_weather", {"city": S}, ["city"])],
     "ground_truth": [{"get_weather": {"city": ["Paris", "Tokyo"]}}, {"get_weather": {"city": ["Paris"]}}],
     "outputs": {"right-greedy-order": [{"get_weather": {"city": "Tokyo"}}, {"get_weather": {"city": "Paris"}}],
                 "right-only-by-full-matching": [{"get_weather": {"city": "Paris"}}, {"get_weather": {"city": "Tokyo"}}],
                 "wrong-twice-tokyo": [{"get_weather": {"city": "Tokyo"}}, {"get_weather": {"city": "Tokyo"}}]}},
    {"id": "hw_parallel_multiple", "category": "parallel_multiple", "function": [
        _fn("get_weather", {"city": S}, ["city"]), _fn("stock.price", {"ticker": S}, ["ticker"])],
     "ground_truth": [{"get_weather": {"city": ["Paris"]}}, {"stock.price": {"ticker": ["AAPL"]}}],
     "outputs": {"right": [{"stock_price": {"ticker": "aapl"}}, {"get_weather": {"city": "Paris"}}],
                 "wrong-dotted-name": [{"stock.price": {"ticker": "AAPL"}}, {"get_weather": {"city": "Paris"}}],
                 "wrong-one-missing": [{"get_weather": {"city": "Paris"}}],
                 "wrong-extra-call": [{"get_weather": {"city": "Paris"}}, {"stock_price": {"ticker": "AAPL"}},
                                      {"get_weather": {"city": "Paris"}}]}},
    {"id": "hw_multiple", "category": "multiple", "function": [
        _fn("get_weather", {"city": S}, ["city"]), _fn("get_time", {"city": S}, ["city"])],
     "ground_truth": [{"get_time": {"city": ["Tokyo"]}}],
     "outputs": {"right": [{"get_time": {"city": "tokyo"}}],
                 "wrong-function": [{"get_weather": {"city": "Tokyo"}}],
                 "wrong-two-calls": [{"get_time": {"city": "Tokyo"}}, {"get_weather": {"city": "Tokyo"}}],
                 "wrong-none": []}},
]


# --------------------------------------------------------------------------------------------

def bfcl_data() -> Path:
    found = glob.glob(str(REPO / ".venv-bfcl" / "lib" / "python3*" / "site-packages" / "bfcl_eval" / "data"))
    if not found:
        sys.exit("no .venv-bfcl: run scripts/setup.sh")
    return Path(found[0])


def sampled(rng: random.Random) -> list[dict]:
    data, out = bfcl_data(), []
    for category, n in SAMPLE.items():
        questions = [json.loads(line) for line in (data / f"BFCL_v4_{category}.json").open()]
        answers = {a["id"]: a["ground_truth"] for a in map(json.loads, (data / "possible_answer" / f"BFCL_v4_{category}.json").open())}
        forced = [q for q in questions if q["id"] in FORCED]
        fits = [q for q in questions if q["id"] not in FORCED and len(json.dumps(q["function"])) <= MAX_DOC_CHARS]
        for q in forced + rng.sample(fits, n):
            out.append({"id": q["id"], "category": category, "function": q["function"], "ground_truth": answers[q["id"]]})
    return out


def main() -> None:
    global Q
    rng = random.Random(20)
    lines = []
    for q in sampled(rng):
        Q = q
        docs = {f["name"]: f for f in q["function"]}
        right = [right_call(item, docs, rng) for item in q["ground_truth"]]
        outputs = {"right": right, "right-optional-left-out": [right_call(i, docs, rng, "omit") for i in q["ground_truth"]],
                   "right-optional-given": [right_call(i, docs, rng, "give") for i in q["ground_truth"]]}
        names = list(MUTATIONS)
        rng.shuffle(names)
        for name in names:
            if sum(not k.startswith("right") for k in outputs) >= MUTATIONS_PER_QUESTION:
                break
            mutated = MUTATIONS[name](right, rng)
            if mutated is not None and mutated != right:
                outputs[name] = mutated
        unique = {}
        for kind, out in outputs.items():  # judge each distinct output once
            unique.setdefault(json.dumps(out, sort_keys=True), (kind, out))
        lines.append({**q, "outputs": dict(unique.values())})
    for hw in HANDWRITTEN:
        lines.append(hw)
    with OUT.open("w") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"{sum(len(x['outputs']) for x in lines)} judged outputs of {len(lines)} questions -> {OUT}")


if __name__ == "__main__":
    main()
