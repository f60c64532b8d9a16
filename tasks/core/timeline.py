"""A deploy's cold start, phase by phase: from the deploy's request to the first token.

Users of every serving stack complain first about cold start, and a deploy that is a black box until
`/v1/models` answers cannot be shortened: the timeline says where the minutes went. Where each phase
comes from (PHASES lists them in the order they happen):
- the image's entrypoint (images/vllm/entrypoint.py) prints one line per phase of its own,
  `[entrypoint] phase=<name> t=<unix seconds> key=value ...`: start, model fetch begin and end (bytes
  fetched from S3 and reused from the host cache), verify end, exec of vLLM;
- vLLM 0.32's own log lines (VLLM_PHASES: the engine starts, weights loaded, torch.compile, KV cache
  sized, CUDA graphs, engine ready, API server listening) and uvicorn's access line of the first
  `/health` 200 (only where the line has a time of its own: CloudWatch);
- on ECS, the service's events, its task and its host (tasks/targets/ecs/coldstart.py);
- what the deploy measured itself: its start, the server's start, the first `/health` 200 and
  `/v1/models` listing the served name (local target), the first token of a one-token completion.

Clocks: a line read from CloudWatch has the time the container wrote it (the awslogs driver's
timestamp, in milliseconds), and that is used for every line of the stream; a line of the local
target's log file has only its own: the entrypoint's `t=`, or vLLM's `%m-%d %H:%M:%S` stamp, in whole
seconds of the server's local time (the entrypoint's start line gives the year and the UTC offset).
A line written after another happened after it, so a whole-second stamp that reads earlier than a
line above it (by less than the second it was cut to) is raised to that line's time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, field_validator

from tasks.core.endpoint import Endpoint, EndpointError
from tasks.core.markdown import Md, code, table, text

# name -> what the table calls it, in the order a cold start goes through them
PHASES: dict[str, str] = {
    "deploy-start": "deploy started",
    "server-requested": "server requested (process started; ECS: deployment created)",
    "host-launch": "GPU host launched",
    "host-registered": "GPU host joined the cluster",
    "task-started": "ECS started the task",
    "image-pull-begin": "image pull began",
    "image-pull-end": "image pulled",
    "container-started": "container running",
    "entrypoint-start": "entrypoint started",
    "fetch-begin": "model fetch began",
    "fetch-end": "model fetched",
    "verify-end": "model verified",
    "exec": "vLLM started (exec)",
    "engine-init": "vLLM engine initialising",
    "weights-loaded": "weights loaded",
    "compiled": "torch.compile done",
    "kv-cache": "KV cache allocated",
    "graphs-captured": "CUDA graphs captured",
    "engine-ready": "engine ready (profile, KV cache, warm-up)",
    "api-server": "API server listening",
    "targets-registered": "registered with the load balancer",
    "health": "first /health 200",
    "steady-state": "ECS service steady",
    "ready": "/v1/models serves the model",
    "first-token": "first token",
}
ENTRYPOINT_PHASES = {"start": "entrypoint-start", "fetch-begin": "fetch-begin", "fetch-end": "fetch-end",
                     "verify-end": "verify-end", "exec": "exec"}

Source = Literal["deploy", "ecs", "entrypoint", "vllm"]

# vLLM 0.32's messages (file:line in vllm 0.32.0): (phase, pattern, keep the last match instead of the first)
VLLM_PHASES: list[tuple[str, re.Pattern, bool]] = [
    ("engine-init", re.compile(r"Initializing a V1 LLM engine \(v(?P<version>[^)]+)\)"), False),  # v1/engine/core.py:134
    # default_loader.py:502 per worker, then gpu_model_runner.py:5150 (GPU); the last one: every worker loaded
    ("weights-loaded", re.compile(r"(?:Loading weights|Model loading) took (?:(?P<gib>[\d.]+) GiB memory and )?"
                                  r"(?P<s>[\d.]+) sec"), True),
    ("compiled", re.compile(r"torch\.compile took (?P<s>[\d.]+) s in total"), True),  # compilation/monitor.py:20
    ("kv-cache", re.compile(r"(?P<device>\w+) KV cache size: (?P<tokens>[\d,]+) tokens"), False),  # kv_cache_utils.py:2328
    ("graphs-captured", re.compile(r"Graph capturing finished in (?P<s>\d+) secs"), True),  # gpu_model_runner.py:6582
    ("engine-ready", re.compile(r"init engine \(profile, create kv cache, warmup model\) took (?P<s>[\d.]+) s"), False),
    ("api-server", re.compile(r"Starting vLLM server on (?P<url>\S+)"), False),  # launchers/api_server/entry.py:140
]
_ENTRY = re.compile(r"\[entrypoint\] phase=(?P<name>[\w-]+) t=(?P<t>\d+(?:\.\d+)?)(?P<rest>.*)")
_FIELD = re.compile(r"(\w+)=(\S+)")
_VLLM = re.compile(r"\((?P<proc>[\w-]+) pid=(?P<pid>\d+)\) [A-Z]+ (?P<stamp>\d\d-\d\d \d\d:\d\d:\d\d) \[[^\]]*\] (?P<msg>.*)")
# The Run:ai streamer's own line (runai_model_streamer 0.17, its Python logger on stderr: the entrypoint sets
# RUNAI_STREAMER_LOG_TO_STDERR=1); vLLM's streamer loader logs no load time of its own. Its stamp: local time, ms.
_RUNAI = re.compile(r"(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(?P<ms>\d{3}) \[INFO\] \[RunAI Streamer\] "
                    r"Overall time to stream (?P<size>.+?) of all files to (?P<device>\w+): (?P<s>[\d.]+)s")
_HEALTH = re.compile(r'"GET /health HTTP/[\d.]+" 200')  # uvicorn's access line: no time of its own
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LAST = {name for name, _, last in VLLM_PHASES if last}


class Phase(BaseModel):
    name: str
    at: float  # unix seconds
    source: Source
    detail: str = ""

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PHASES:
            raise ValueError(f"unknown cold-start phase {v!r}; known: {list(PHASES)}")
        return v

    @property
    def label(self) -> str:
        return PHASES[self.name]


class Timeline(BaseModel):
    """The phases one deploy went through, in time order (ties in PHASES order); at most one of each."""

    phases: list[Phase] = []

    @classmethod
    def build(cls, phases: Iterable[Phase | None]) -> "Timeline":
        """The first phase given of each name wins (give the better source first); None is skipped."""
        kept: dict[str, Phase] = {}
        for p in phases:
            if p is not None and p.name not in kept:
                kept[p.name] = p
        order = list(PHASES)
        return cls(phases=sorted(kept.values(), key=lambda p: (p.at, order.index(p.name))))

    def get(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    @property
    def origin(self) -> float | None:
        return self.phases[0].at if self.phases else None

    def seconds_to(self, name: str) -> float | None:
        """Seconds from the first phase to `name` (None when it was not seen)."""
        p = self.get(name)
        return None if p is None or self.origin is None else round(p.at - self.origin, 3)

    def rows(self) -> list[tuple[Phase, float, float | None]]:
        """(phase, seconds since the first phase, seconds since the one before)."""
        out, prev = [], None
        for p in self.phases:
            out.append((p, p.at - self.origin, None if prev is None else p.at - prev.at))
            prev = p
        return out


# ------------------------------------------------------------------------------------------- parsing


def _stamp_to_unix(stamp: str, utc_offset: int, reference: float) -> float:
    """vLLM's `%m-%d %H:%M:%S` (local time at `utc_offset` seconds east of UTC) to unix seconds, in the
    year that puts it nearest to `reference` (a log read across New Year keeps its order)."""
    tz = timezone(timedelta(seconds=utc_offset))
    ref = datetime.fromtimestamp(reference, tz)
    best = None
    for year in (ref.year - 1, ref.year, ref.year + 1):
        try:
            t = datetime.strptime(f"{year}-{stamp}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=tz).timestamp()
        except ValueError:  # 02-29 in a year without it
            continue
        if best is None or abs(t - reference) < abs(best - reference):
            best = t
    return best if best is not None else reference


def _mb(value: str) -> str:
    return f"{int(value) / 1e6:,.1f} MB"


def _entry_detail(name: str, fields: dict[str, str]) -> str:
    if name == "fetch-end" and "fetched_bytes" in fields:
        return (f"{_mb(fields['fetched_bytes'])} fetched from S3, {_mb(fields.get('reused_bytes', '0'))} reused from the "
                f"host cache ({fields.get('files', '?')} files)")
    if name == "exec" and fields.get("how") == "in-process":
        return "in the entrypoint's process: vLLM was imported while the model was fetched"
    if name == "fetch-begin" and "uri" in fields:
        return fields["uri"]
    if name == "verify-end" and fields.get("how"):
        return {"marker": "unchanged since verified (no re-hash)", "sha256": "sha256 of every file against the manifest",
                "s3-head": "S3 objects' sizes and recorded sha256 against the manifest (streamed by vLLM, not hashed)"}.get(
            fields["how"], fields["how"])
    return ""


def _vllm_detail(name: str, m: re.Match) -> str:
    g = m.groupdict()
    if name == "engine-init":
        return f"vLLM {g['version']}"
    if name == "weights-loaded":
        return f"vLLM: took {float(g['s']):.1f} s" + (f", {g['gib']} GiB" if g.get("gib") else "")
    if name in ("compiled", "engine-ready", "graphs-captured"):
        return f"vLLM: took {float(g['s']):.1f} s"
    if name == "kv-cache":
        return f"{g['tokens']} tokens ({g['device']})"
    return ""


def parse_log(lines: Iterable[str | tuple[str, float | None]], pid: int | None = None,
              reference: float | None = None) -> list[Phase]:
    """The cold-start phases in one server log: plain lines (a log file) or (line, unix time) pairs
    (CloudWatch events; their time is used for every line). With `pid`, only the run whose entrypoint
    start line names that pid (the local target's log file holds every run of the stack); without, the
    last run in the lines. `reference`: a time near the run, for whole-second stamps without a start line."""
    runs: list[list[tuple[str, float | None]]] = [[]]
    for item in lines:
        line, at = (item, None) if isinstance(item, str) else item
        line = _ANSI.sub("", line.rstrip("\n"))
        m = _ENTRY.search(line)
        if m and m.group("name") == "start" and runs[-1]:
            runs.append([])
        runs[-1].append((line, at))
    if pid is not None:
        mine = [r for r in runs if r and _start_pid(r[0][0]) == pid]
        run = mine[-1] if mine else []
    else:
        run = runs[-1]

    found: dict[str, Phase] = {}
    utc_offset, latest = 0, None
    reference = reference or time.time()
    for line, at in run:
        stamped = at is not None
        phase: Phase | None = None
        if m := _ENTRY.search(line):
            fields = dict(_FIELD.findall(m.group("rest")))
            t = at if stamped else float(m.group("t"))
            if m.group("name") == "start":
                utc_offset = int(fields.get("utc_offset", utc_offset))
                reference = float(m.group("t"))
            name = ENTRYPOINT_PHASES.get(m.group("name"))
            if name:
                phase = Phase(name=name, at=t, source="entrypoint", detail=_entry_detail(m.group("name"), fields))
        elif m := _VLLM.search(line):
            msg = m.group("msg")
            for name, pattern, last in VLLM_PHASES:
                if (hit := pattern.search(msg)) and (last or name not in found):
                    t = at if stamped else _stamp_to_unix(m.group("stamp"), utc_offset, reference)
                    if not stamped and latest is not None and latest - 1 < t < latest:
                        t = latest  # cut to the second: it was written after the line above
                    phase = Phase(name=name, at=t, source="vllm", detail=_vllm_detail(name, hit))
                    break
        elif m := _RUNAI.search(line):
            t = at if stamped else (datetime.strptime(m.group("stamp"), "%Y-%m-%d %H:%M:%S").replace(
                tzinfo=timezone(timedelta(seconds=utc_offset))).timestamp() + int(m.group("ms")) / 1000)
            phase = Phase(name="weights-loaded", at=t, source="vllm",
                          detail=f"Run:ai streamer: {m.group('size')} to {m.group('device')} in {float(m.group('s')):.1f} s")
        elif stamped and "health" not in found and _HEALTH.search(line):
            phase = Phase(name="health", at=at, source="vllm", detail="uvicorn's access log")
        if phase is not None:
            if phase.name not in found or phase.name in _LAST:
                found[phase.name] = phase
            latest = max(latest or phase.at, phase.at)
    return list(found.values())


def _start_pid(line: str) -> int | None:
    m = _ENTRY.search(line)
    if not m or m.group("name") != "start":
        return None
    pid = dict(_FIELD.findall(m.group("rest"))).get("pid")
    return int(pid) if pid and pid.isdigit() else None


# ------------------------------------------------------------------------------------------ measuring


def first_token(url: str, api_key: str, model: str, timeout: float = 60) -> Phase | None:
    """Send a one-token streamed completion and return when its first token came; None (said in the
    detail of nothing: the caller logs it) when the endpoint does not answer with one."""
    started = time.time()
    try:
        with Endpoint(url, api_key, model, timeout=timeout, attempts=1) as ep:
            reply = ep.completion({"prompt": "Hello", "max_tokens": 1, "temperature": 0}, stream=True)
    except EndpointError:
        return None
    if reply.status != 200 or reply.ttft is None:
        return None
    return Phase(name="first-token", at=started + reply.ttft, source="deploy",
                 detail=f"one-token completion: {reply.ttft * 1000:.0f} ms to its first token")


# ------------------------------------------------------------------------------------------ rendering


def render(timeline: Timeline) -> Md:
    """The "Cold start" section of a deploy artifact: one row per phase seen, in time order."""
    if not timeline.phases:
        return Md("## Cold start\n\nNo phase was recorded.")
    rows = [[p.label, f"{at:.1f}", "" if took is None else f"{took:.1f}", p.source, p.detail]
            for p, at, took in timeline.rows()]
    end = next((n for n in ("first-token", "ready") if timeline.get(n)), None)
    total = f"{PHASES[end]} {timeline.seconds_to(end):.1f} s after the {timeline.phases[0].label}" if end else \
        "the server never answered"
    return Md("\n".join([
        "## Cold start", "",
        f"{text(total[0].upper() + total[1:])}. \"took\" is the time since the phase above it; "
        f"{code('vllm')} rows come from the server's log, stamped to the second on the local target.", "",
        table(["phase", "at +s", "took s", "from", "detail"], rows, align="lrrll"),
    ]))
