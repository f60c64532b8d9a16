"""Built-in tools: real implementations a tool set names as `gateway.builtin_tools:<function>` (or
`builtin: <name>` for the whole definition from SPECS).

Each is written for arguments chosen by a model, that is, by whoever wrote the prompt: the calculator
evaluates arithmetic from the syntax tree (no eval; bounded length, node count, exponent and integer
size), the clock reads only the tz database, and fetch reaches only the hosts its tool set allows
(bound by the tool set, never by the model), with size, time and redirect bounds.
"""

from __future__ import annotations

import ast
import asyncio
import math
import operator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from gateway.urls import outbound_url

# ---------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 256
MAX_NODES = 128
MAX_INT_BITS = 4096  # ~1,233 decimal digits: any product of two such numbers is still cheap
MAX_EXPONENT = 10_000

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "exp": math.exp,
              "log": math.log, "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan,
              "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _bounded(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"a number over {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not finite")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    """`**` with the size checked before it is computed (9**9**9 would take minutes and gigabytes)."""
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent {exponent} is larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
            raise ValueError(f"{base}**{exponent} is larger than {MAX_INT_BITS} bits")
    return operator.pow(base, exponent)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(left, right))
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _bounded(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords and len(node.args) <= 8):
        return _bounded(_FUNCTIONS[node.func.id](*[_eval(a) for a in node.args]))
    what = node.id if isinstance(node, ast.Name) else type(node).__name__
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        what = f"{node.func.id}()"
    raise ValueError(f"not allowed in an expression: {what}")


def calculate(expression: str) -> dict[str, Any]:
    """Evaluate arithmetic: numbers, + - * / // % **, parentheses, pi, e and a few math functions."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ValueError(f"expression has more than {MAX_NODES} parts")
    try:
        result = _eval(tree)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("the result is too large") from None
    return {"expression": expression, "result": result}


# ---------------------------------------------------------------- clock


def current_time(timezone: str = "UTC") -> dict[str, Any]:
    """The current date and time in an IANA time zone (e.g. Europe/Paris)."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r} (use an IANA name such as Europe/Paris)") from None
    now = datetime.now(zone)
    return {"timezone": timezone, "iso": now.isoformat(timespec="seconds"), "date": now.date().isoformat(),
            "time": now.strftime("%H:%M:%S"), "weekday": now.strftime("%A"), "utc_offset": now.strftime("%z")}


# ---------------------------------------------------------------- fetch


def host_allowed(host: str, allowed_hosts: list[str]) -> bool:
    """Exact host names; an entry `*.example.com` allows its subdomains (not example.com itself)."""
    host = host.lower().rstrip(".")
    for entry in (a.lower().rstrip(".") for a in allowed_hosts):
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


async def fetch(url: str, *, allowed_hosts: list[str], max_bytes: int = 65_536, timeout_s: float = 10.0,
                max_redirects: int = 3) -> dict[str, Any]:
    """GET a URL on an allowed host; its text, cut at `max_bytes`. Redirects are followed only to allowed
    hosts. The tool set binds `allowed_hosts` (the model cannot see or set it)."""
    async with asyncio.timeout(timeout_s), httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as http:
        for _ in range(max_redirects + 1):
            target = outbound_url(url)
            if not host_allowed(target.host, allowed_hosts):
                raise ValueError(f"host {target.host!r} is not on this tool's allow-list")
            async with http.stream("GET", target) as response:
                if response.is_redirect and "location" in response.headers:
                    url = str(target.join(response.headers["location"]))
                    continue
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        break
                text = bytes(body[:max_bytes]).decode(response.encoding or "utf-8", errors="replace")
                return {"url": str(target), "status": response.status_code,
                        "content_type": response.headers.get("content-type", ""), "text": text,
                        "truncated": len(body) > max_bytes}
    raise ValueError(f"more than {max_redirects} redirects")


# ---------------------------------------------------------------- the definitions a tool set can name

SPECS: dict[str, dict[str, Any]] = {
    "calculate": {
        "description": "Evaluate an arithmetic expression exactly, e.g. '(17.5 * 3) - 2**10' or 'sqrt(2) * pi'.",
        "parameters": {"type": "object", "properties": {"expression": {
            "type": "string", "maxLength": MAX_EXPRESSION_CHARS,
            "description": "numbers, + - * / // % ** and parentheses; pi, e; abs round min max sqrt exp log log10 sin cos tan floor ceil"}},
            "required": ["expression"], "additionalProperties": False},
        "implementation": {"type": "python", "entry_point": "gateway.builtin_tools:calculate"},
    },
    "current_time": {
        "description": "The current date, time and weekday in a time zone.",
        "parameters": {"type": "object", "properties": {"timezone": {
            "type": "string", "description": "an IANA time zone such as Europe/Paris or America/New_York; default UTC"}},
            "additionalProperties": False},
        "implementation": {"type": "python", "entry_point": "gateway.builtin_tools:current_time"},
    },
    "fetch": {
        "description": "Fetch a web page or API response (GET) from an allowed host and return its text.",
        "parameters": {"type": "object", "properties": {"url": {"type": "string", "description": "an https:// URL"}},
                       "required": ["url"], "additionalProperties": False},
        "implementation": {"type": "python", "entry_point": "gateway.builtin_tools:fetch"},
    },
}
