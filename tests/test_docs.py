"""The documentation: ``mkdocs build --strict`` passes, and every ```python block in docs/ runs.

Each block runs as its own script in a fresh temporary directory (its cwd), in a child
process with a timeout.  Directives on a block's first line:

- ``# docs: continued``: run after the previous blocks of the same page it chains to
  (a chain starts at the last block without the directive);
- ``# docs: needs redis``: ``REDIS_URL`` is set to a real test server (skipped without one);
- ``# docs: needs postgres``: ``POSTGRES_URL`` likewise.

A failure names the page and the line of the block where the error happened.
"""
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BLOCK_TIMEOUT = 120

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^\n]*$")


@dataclass
class Block:
    page: str  #: path relative to the repository, e.g. docs/testing.md
    line: int  #: line of the block's first code line in the page (1-based)
    code: str
    continued: bool
    needs: Tuple[str, ...]


def blocks_of(path: Path, name: str = "") -> List[Block]:
    """The ```python blocks of one Markdown page (called ``name`` in reports), with their directives."""
    found: List[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.group("indent"), match.group("fence"), match.group("lang").lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if lang in ("python", "py"):
            first = body[0].strip() if body else ""
            spec = first[1:].strip() if first.startswith("#") else ""
            directives = [d.strip() for d in spec[len("docs:"):].split(",")] if spec.startswith("docs:") else []
            continued = any(d == "continued" for d in directives)
            needs = tuple(d.split()[1] for d in directives if d.startswith("needs "))
            found.append(Block(name or str(path.relative_to(REPO)), i + 2, "\n".join(body) + "\n", continued, needs))
        i = j + 1
    return found


def chains() -> List[List[Block]]:
    """Per block, the blocks to run: the block itself, after the ones it continues."""
    result: List[List[Block]] = []
    for page in sorted(DOCS.rglob("*.md")):
        chain: List[Block] = []
        for block in blocks_of(page):
            chain = chain + [block] if block.continued and chain else [block]
            result.append(chain)
    return result


CHAINS = chains()


def _script(chain: List[Block]) -> Tuple[str, List[Tuple[int, Block]]]:
    """The chain as one script, and where each block starts in it (script line, block)."""
    parts, starts, line = [], [], 1
    for block in chain:
        header = f"# ---- {block.page}:{block.line}\n"
        parts.append(header)
        line += 1
        starts.append((line, block))
        parts.append(block.code)
        line += block.code.count("\n")
    return "".join(parts), starts


def _where(stderr: str, starts: List[Tuple[int, Block]]) -> str:
    """``docs/page.md:LINE`` of the deepest traceback frame inside the script."""
    numbers = [int(n) for n in re.findall(r'File "[^"]*docs_block\.py", line (\d+)', stderr)]
    if not numbers:
        return f"{starts[-1][1].page}:{starts[-1][1].line}"
    n = numbers[-1]
    start, block = max((s for s in starts if s[0] <= n), key=lambda s: s[0])
    return f"{block.page}:{block.line + n - start}"


def test_docs_have_python_examples():
    assert len(CHAINS) >= 10, "the docs lost their examples"


@pytest.mark.parametrize("chain", CHAINS, ids=[f"{c[-1].page}:{c[-1].line}" for c in CHAINS])
def test_docs_example_runs(chain: List[Block], tmp_path, request):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    needs = {need for block in chain for need in block.needs}
    if "redis" in needs:
        env["REDIS_URL"] = request.getfixturevalue("redis_url")  # skips (or fails in CI) without a server
    if "postgres" in needs:
        try:
            env["POSTGRES_URL"] = request.getfixturevalue("postgres_url")
        except pytest.FixtureLookupError:
            if not os.environ.get("POSTGRES_URL"):
                pytest.skip("needs PostgreSQL: no postgres_url fixture and no POSTGRES_URL in the environment")
    unknown = needs - {"redis", "postgres"}
    assert not unknown, f"unknown directive 'needs {sorted(unknown)}' in {chain[-1].page}:{chain[-1].line}"
    script, starts = _script(chain)
    path = tmp_path / "docs_block.py"
    path.write_text(script, encoding="utf-8")
    try:
        result = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the example at {chain[-1].page}:{chain[-1].line} ran longer than {BLOCK_TIMEOUT} s")
    if result.returncode != 0:
        pytest.fail(f"the example at {_where(result.stderr, starts)} failed (exit {result.returncode}):\n"
                    f"{result.stderr[-3000:]}", pytrace=False)


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs and mkdocstrings are not installed: pip install -e '.[docs]' (CI installs them)")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    problems = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, "\n".join(problems) or result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "wait_until_idle" in api and "PortableLockFile" in api  # the reference came from the docstrings


def test_block_parser_reads_directives(tmp_path):
    path = tmp_path / "page.md"
    path.write_text("# t\n\n```python\nx = 1\n```\n\n```python\n# docs: continued\nassert x == 1\n```\n\n"
                    "```bash\nnot python\n```\n\n```python\n# docs: needs redis, continued\nprint(x)\n```\n")
    parsed = blocks_of(path, "page.md")
    assert [(b.line, b.continued, b.needs) for b in parsed] == [(4, False, ()), (8, True, ()),
                                                                 (17, True, ("redis",))]
