"""Dockerfiles as data: parsed instructions, the local files COPY/ADD read, and the checks that bite in production.

Pure functions (no builder needed): the build flow uses them to hash exactly what a build
reads, and the tests use them to hold the project's Dockerfiles to the rules.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

from blocks.image_build import SECRET_NAME


@dataclass(frozen=True)
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY...
    args: str  # the rest of the instruction, continuation lines joined
    line: int  # 1-based line of the instruction's first line

    @property
    def json_args(self) -> list[str] | None:
        """The exec (JSON array) form's strings, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")
_HEREDOC = re.compile(r"<<-?\s*[\"']?([A-Za-z_][A-Za-z0-9_]*)[\"']?")


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments dropped, continuation lines joined, heredoc bodies kept in args."""
    lines = text.splitlines()
    escape = "\\"
    i = 0
    # Parser directives: only at the very top, before any comment, blank line or instruction.
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            break
        if m.group(1).lower() == "escape" and m.group(2) in ("\\", "`"):
            escape = m.group(2)
        i += 1
    out: list[Instruction] = []
    while i < len(lines):
        raw = lines[i]
        start = i
        i += 1
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = [stripped]
        while parts[-1].endswith(escape) and i < len(lines):
            parts[-1] = parts[-1][: -len(escape)].rstrip()
            nxt = lines[i].strip()
            i += 1
            if nxt.startswith("#"):
                parts.append(escape)  # a comment inside a continuation: skipped, the continuation goes on
                continue
            parts.append(nxt)
        if parts[-1] == escape:
            parts[-1] = ""
        joined = " ".join(p for p in parts if p).strip()
        cmd, _, args = joined.partition(" ")
        for marker in _HEREDOC.findall(args) if cmd.upper() in ("RUN", "COPY", "ADD") else []:
            body = []
            while i < len(lines) and lines[i].strip() != marker:
                body.append(lines[i])
                i += 1
            i += 1  # the terminator
            args += "\n" + "\n".join(body) + "\n" + marker
        out.append(Instruction(cmd=cmd.upper(), args=args.strip(), line=start + 1))
    return out


def _flags_and_rest(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    k = 0
    while k < len(tokens) and tokens[k].startswith("--"):
        name, _, value = tokens[k][2:].partition("=")
        flags[name] = value
        k += 1
    return flags, tokens[k:]


def _tokens(ins: Instruction) -> list[str]:
    json_form = ins.json_args
    if json_form is not None:
        return json_form
    head = ins.args.split("\n", 1)[0]  # heredoc bodies are not arguments
    try:
        return shlex.split(head, posix=True)
    except ValueError:
        return head.split()


@dataclass(frozen=True)
class Stage:
    image: str  # the FROM reference as written (flags stripped)
    name: str | None  # AS name
    instructions: tuple[Instruction, ...]  # the stage's instructions after FROM


def stages(instructions: list[Instruction]) -> list[Stage]:
    result: list[Stage] = []
    current: list[Instruction] = []
    image, name = None, None
    for ins in instructions:
        if ins.cmd == "FROM":
            if image is not None:
                result.append(Stage(image, name, tuple(current)))
            _, rest = _flags_and_rest(_tokens(ins))
            image = rest[0] if rest else ""
            name = rest[2] if len(rest) >= 3 and rest[1].lower() == "as" else None
            current = []
        elif image is not None:
            current.append(ins)
    if image is not None:
        result.append(Stage(image, name, tuple(current)))
    return result


def global_args(instructions: list[Instruction]) -> dict[str, str | None]:
    """ARGs declared before the first FROM (the only ones a FROM line can use), with their defaults."""
    out: dict[str, str | None] = {}
    for ins in instructions:
        if ins.cmd == "FROM":
            break
        if ins.cmd == "ARG":
            for tok in _tokens(ins):
                name, sep, value = tok.partition("=")
                out[name] = value if sep else None
    return out


_VAR = re.compile(r"\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def substitute(value: str, variables: dict[str, str | None]) -> str:
    """`$NAME`, `${NAME}`, `${NAME:-default}` replaced where known; unknown ones are left as written."""

    def repl(m: re.Match) -> str:
        got = variables.get(m.group("braced") or m.group("bare"))
        return got if got else (m.group("default") or m.group(0))

    return _VAR.sub(repl, value)


def base_images(instructions: list[Instruction], build_args: dict[str, str] | None = None) -> list[str]:
    """External images the build starts from (stage names and `scratch` excluded), ARGs substituted."""
    variables = {**global_args(instructions), **(build_args or {})}
    names: set[str] = set()
    out = []
    for st in stages(instructions):
        ref = substitute(st.image, variables)
        if ref.lower() != "scratch" and ref not in names and ref not in out:
            out.append(ref)
        if st.name:
            names.add(st.name)
    return out


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Context paths that COPY/ADD read (not `--from=` copies, not URLs), in order, as written."""
    out: list[str] = []
    for ins in instructions:
        if ins.cmd not in ("COPY", "ADD"):
            continue
        flags, rest = _flags_and_rest(_tokens(ins))
        if "from" in flags or len(rest) < 2:
            continue
        if "<<" in ins.args.split("\n", 1)[0]:  # heredoc content is inline, not from the context
            continue
        for src in rest[:-1]:
            if re.match(r"^[a-z][a-z0-9+.-]*://", src) or src.startswith("git@"):
                continue
            out.append(src)
    return out


def _split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'host:5000/a/b:tag@sha256:..' -> ('host:5000/a/b', 'tag', 'sha256:..')."""
    name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        return name, tag, digest or None
    return name, None, digest or None


def _env_pairs(ins: Instruction) -> list[tuple[str, str]]:
    toks = _tokens(ins)
    if toks and "=" not in toks[0]:  # legacy `ENV KEY value with spaces`
        return [(toks[0], " ".join(toks[1:]))]
    return [(t.partition("=")[0], t.partition("=")[2]) for t in toks]


def lint_dockerfile(text: str, require_healthcheck: bool = False) -> list[str]:
    """What bites in production, as one message per problem (empty: clean).

    - every base image pinned: a tag other than `latest`, or a digest;
    - no ENV/ARG whose name looks like a secret with a value baked in;
    - HEALTHCHECK in the final stage (when required);
    - ENTRYPOINT in exec (JSON) form, so the process gets the signals (no `sh -c` in between);
    - a non-root USER in the final stage.
    """
    instructions = parse_dockerfile(text)
    problems: list[str] = []
    sts = stages(instructions)
    if not sts:
        return ["no FROM instruction"]
    variables = global_args(instructions)
    stage_names: set[str] = set()
    for st in sts:
        ref = substitute(st.image, variables)
        if ref.lower() == "scratch" or ref in stage_names:
            pass
        elif "$" in ref:
            problems.append(f"FROM {st.image}: the base image depends on a build arg without a pinned default")
        else:
            _, tag, digest = _split_ref(ref)
            if digest is None and (tag is None or tag == "latest"):
                problems.append(f"FROM {st.image}: base image not pinned (give a version tag or a digest, never latest)")
        if st.name:
            stage_names.add(st.name)
    for ins in instructions:
        if ins.cmd == "ENV":
            pairs = _env_pairs(ins)
        elif ins.cmd == "ARG":
            pairs = [(t.partition("=")[0], t.partition("=")[2]) for t in _tokens(ins)]
        else:
            continue
        for name, value in pairs:
            if SECRET_NAME.search(name) and value.strip().strip("\"'"):
                problems.append(f"line {ins.line}: {ins.cmd} {name} bakes a secret-looking value into the image")
    final = sts[-1].instructions
    health = [i for i in final if i.cmd == "HEALTHCHECK"]
    if require_healthcheck and (not health or health[-1].args.strip().upper() == "NONE"):
        problems.append("no HEALTHCHECK in the final stage")
    entry = [i for i in final if i.cmd == "ENTRYPOINT"]
    if not entry:
        problems.append("no ENTRYPOINT in the final stage")
    elif entry[-1].json_args is None:
        problems.append(f"line {entry[-1].line}: ENTRYPOINT in shell form: signals go to /bin/sh, not the server (use the JSON form)")
    users = [i for i in final if i.cmd == "USER"]
    if not users:
        problems.append("no USER in the final stage: the image runs as root")
    else:
        user = users[-1].args.strip().split(":", 1)[0]
        if user in ("root", "0"):
            problems.append(f"line {users[-1].line}: USER {users[-1].args.strip()} runs as root")
    return problems
