"""The README is the front door and docs/ holds the reference: the README stays short, links every page,
and no link or repo path in either points at something that is not there (the code moves; the docs must
follow). Fast, no network: it reads markdown and looks at the file tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 200

# Paths that exist only once something has run (the environments `scripts/setup.sh` makes, the cache).
RUNTIME_PATHS = (".venv/", ".venv-vllm/", ".venv-bfcl/", "~/.cache/vllm-pipeline")
# Python paths of other projects that pages quote (vLLM's and BFCL's sources), not of this repo.
FOREIGN_SOURCES = ("vllm/", "bfcl_eval/", "fused_moe/", "experts/", "constants/")
FILE_SUFFIXES = ("py", "md", "yaml", "yml", "json", "txt", "sh", "toml", "jinja")
PACKAGES = ("tasks", "flows", "blocks", "embedded", "gateway")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`]+`", re.S)
SPLIT = re.compile(r"[\s'\"(),;=\[\]{}`]+")
MODULE = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+$")


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides tests/conftest.py's autouse Prefect test server for this module: nothing here needs it."""
    yield


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _top_level() -> set[str]:
    """What a repo path starts with: the repo root's entries (not hidden ones, not build leftovers)."""
    return {p.name for p in REPO.iterdir() if not p.name.startswith(".") and not p.name.endswith(".egg-info")}


def _code_tokens(text: str) -> list[str]:
    """Words inside inline code and fenced blocks; a `<placeholder>` becomes a glob `*`."""
    tokens = []
    for span in CODE.findall(text):
        span = re.sub(r"<[^<>`]*>", "*", span.strip("`"))
        tokens += [t.rstrip(".,:;") for t in SPLIT.split(span) if t.rstrip(".,:;")]
    return tokens


def _exists(path: str) -> bool:
    if "*" in path:
        return any(REPO.glob(path.rstrip("/")))
    return (REPO / path).exists()


def _module_problem(dotted: str) -> str | None:
    """`tasks.core.errors.flow`: the longest prefix that is a module must exist, and what follows it
    must be a name that module defines at top level."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:n])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source.is_file():
            break
    else:
        return f"`{dotted}`: no such module"
    rest = parts[n:]
    if not rest:
        return None
    if n == 1 or len(rest) > 1:
        return f"`{dotted}`: no module `{'.'.join(parts[:n + 1])}`"
    names = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return None if rest[0] in names else f"`{dotted}`: `{source.relative_to(REPO)}` defines no `{rest[0]}`"


def path_problems(text: str) -> list[str]:
    """Every repo path (or module) a page names in backticks that is not in the repo.

    A token is checked when it starts with one of the repo root's entries (`tasks/core/markdown.py`,
    `images/<name>/`, `prefect.yaml`), when it is a hidden or home path (`.venv/bin/python`,
    `~/.cache/...`: allowed only if RUNTIME_PATHS lists it), when it is any `.py` path not of
    FOREIGN_SOURCES, and when it is a dotted module of this repo (`blocks.model_store`)."""
    top = _top_level()
    problems = []
    for token in dict.fromkeys(_code_tokens(text)):
        if "://" in token or token.startswith("/"):
            continue  # URLs, S3 URIs, HTTP routes, absolute system paths
        if MODULE.match(token) and token.rsplit(".", 1)[1] not in FILE_SUFFIXES:
            if problem := _module_problem(token):
                problems.append(problem)
            continue
        if token.startswith(RUNTIME_PATHS):
            continue
        first = token.split("/", 1)[0]
        hidden = re.match(r"^(\.[A-Za-z]|~/)", token) and "/" in token
        python = "/" in token and token.endswith(".py") and not token.startswith(FOREIGN_SOURCES)
        if (first in top or hidden or python) and not _exists(token):
            problems.append(f"`{token}`: not in the repo")
    return problems


def link_problems(page: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, anchors in the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            problems.append(f"[...]({target}): {path} does not exist")
    return problems


def test_readme_is_the_front_door_not_the_manual():
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move reference sections to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.split("#", 1)[0]).resolve() for t in LINK.findall(README.read_text())}
    missing = [_rel(p) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page: Path):
    problems = link_problems(page, page.read_text())
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_repo_paths_in_backticks_exist(page: Path):
    problems = path_problems(page.read_text())
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


def test_the_checks_catch_what_does_not_exist():
    """The checks above are only worth something if they can fail: made-up paths, modules and links
    are reported; real ones, run-time paths, other projects' sources, URLs and routes are not."""
    page = """
    Real: `tasks/core/markdown.py`, `images/<name>/`, `prefect.yaml`, `blocks.model_store`, `tasks.core.errors.flow`,
    run as `.venv/bin/python -m embedded.demo`; `~/.cache/vllm-pipeline/stacks/<stack>/server.log` appears at run time.
    Not ours or not files: `vllm/v1/worker/gpu_worker.py`, `s3://b/jobs/in/a.jsonl`, `/v1/models`, `HuggingFaceTB/SmolLM2-135M-Instruct`.
    Made up: `tasks/core/nowhere.py` and
    ```bash
    .venv/bin/python scripts/no_such_script.sh
    ```
    `task/core/markdown.py`, `tasks/deploy.py`, `tasks.core.nowhere`, `tasks.core.errors.no_such_name`, `.venv-other/x`.
    """
    assert path_problems(page) == [
        "`tasks/core/nowhere.py`: not in the repo",
        "`scripts/no_such_script.sh`: not in the repo",
        "`task/core/markdown.py`: not in the repo",
        "`tasks/deploy.py`: not in the repo",
        "`tasks.core.nowhere`: `tasks/core/__init__.py` defines no `nowhere`",
        "`tasks.core.errors.no_such_name`: `tasks/core/errors.py` defines no `no_such_name`",
        "`.venv-other/x`: not in the repo",
    ]
    links = "[ok](docs/capacity.md#calibration) [web](https://example.com) [gone](docs/nowhere.md#x)"
    assert link_problems(README, links) == ["[...](docs/nowhere.md#x): docs/nowhere.md does not exist"]
