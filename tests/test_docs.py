"""Every Python example in README.md and docs/*.md runs, their links resolve, and the example scripts run (small,
on the CPU).

A ```python block runs as it is, in a fresh namespace. A block preceded by ``<!-- skip: reason -->`` is skipped with
that reason (for code that needs a GPU or FlashAttention-4); a block that imports transformers is skipped only where
transformers is not importable (likewise hypothesis).
"""

from __future__ import annotations

import importlib
import pathlib
import re
import runpy
import sys
import types
from typing import Any, NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC_FILES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.S | re.M)
# an optional `<!-- skip: reason -->` line (blank lines may follow it), then the fenced block
_PYTHON = re.compile(r"(?:^<!--\s*skip:\s*(?P<skip>[^\n]*?)\s*-->[ \t]*\n(?:[ \t]*\n)*)?"
                     r"^```python[ \t]*\n(?P<code>.*?)^```", re.S | re.M)
_OPTIONAL = {  # blocks that import these are skipped only where the package is missing
    "transformers": re.compile(r"^\s*(?:from|import)\s+(?:transformers|sdpa_flash\.integrations\.transformers)\b",
                               re.M),
    "hypothesis": re.compile(r"^\s*(?:from|import)\s+hypothesis\b", re.M),
}


class Block(NamedTuple):
    file: str
    index: int
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.file}[{self.index}]"


def python_blocks(file: str, text: str | None = None) -> list[Block]:
    text = (ROOT / file).read_text() if text is None else text
    return [Block(file, i, m["code"], m["skip"]) for i, m in enumerate(_PYTHON.finditer(text))]


def readme_blocks() -> list[str]:
    return [b.code for b in python_blocks("README.md")]


def _importable(module: str) -> str | None:
    """None when ``module`` imports, else why not."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not importable: {exc}"
    return None


def _block_params() -> list[Any]:
    params = []
    for file in DOC_FILES:
        for block in python_blocks(file):
            marks = []
            if block.skip is not None:
                marks.append(pytest.mark.skip(reason=block.skip or "marked <!-- skip: ... --> in the page"))
            for module, pattern in _OPTIONAL.items():
                if pattern.search(block.code):
                    why = _importable(module)
                    marks.append(pytest.mark.skipif(why is not None, reason=why or ""))
            params.append(pytest.param(block, id=block.id, marks=marks))
    return params


def test_readme_has_python_examples() -> None:
    assert len(readme_blocks()) >= 1


@pytest.mark.parametrize("block", _block_params())
def test_doc_example_runs(block: Block) -> None:
    # A real module in sys.modules: torch.compile looks a traced function's globals up by its module's name (torch
    # 2.11 fails with ModuleNotFoundError otherwise).
    module = types.ModuleType("docs_example")
    sys.modules["docs_example"] = module
    try:
        exec(compile(block.code, f"{block.id} (python block {block.index} of {block.file})", "exec"), module.__dict__)
    finally:  # leave no trace for the other tests: the drop-in example installs `import flash_attn`; policies
        sys.modules.pop("docs_example", None)
        compat = sys.modules.get("sdpa_flash.compat")
        if compat is not None:
            compat.uninstall()
        sdpa_flash = sys.modules.get("sdpa_flash")
        if sdpa_flash is not None:
            sdpa_flash.set_policy(None)


def test_block_parser_reads_skip_comments() -> None:
    page = ("text\n<!-- skip: needs a GPU -->\n```python\nimport a\n```\n\n```bash\nls\n```\n"
            "```python\nimport b\n```\nsee <!-- skip: not this --> inline\n```python\nimport c\n```\n")
    blocks = python_blocks("page.md", page)
    assert [(b.id, b.code, b.skip) for b in blocks] == [
        ("page.md[0]", "import a\n", "needs a GPU"), ("page.md[1]", "import b\n", None),
        ("page.md[2]", "import c\n", None)]


def test_readme_first_screen_has_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text()[:1500]
    assert "python -m sdpa_flash" in head and "python -m pytest" in head


def test_readme_test_command_is_the_ci_command() -> None:
    """.ci/run ends with the README's test command, exactly."""
    ci_last = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()][-1].strip()
    assert ci_last in (ROOT / "README.md").read_text()[:1500], ci_last


def test_readme_is_a_front_door() -> None:
    """Read in two minutes: at most ~250 lines; the details live in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)


@pytest.mark.parametrize("file", ["README.md", "docs/attention.md"])
def test_written_signature_of_attention_is_the_real_one(file: str) -> None:
    """The ``attention(query, key, value, *, ...)`` line the page shows: the same keywords, in order, with the same
    defaults as the function (a new argument that the page does not show fails here)."""
    import inspect

    import sdpa_flash

    text = " ".join((ROOT / file).read_text().split())
    m = re.search(r"`attention\(query, key, value, \*, ([^`]*)\)`", text)
    assert m, f"{file} shows no attention(query, key, value, *, ...) signature"
    written = [tuple(p.strip().split("=", 1)) for p in m[1].split(",")]
    params = inspect.signature(sdpa_flash.attention).parameters.values()
    real = [(p.name, repr(p.default).replace("'", '"')) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert written == real


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = _slug(m[1])
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(file: str) -> list[str]:
    text = _FENCE.sub("", (ROOT / file).read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


@pytest.mark.parametrize("file", DOC_FILES)
def test_doc_links_resolve(file: str) -> None:
    """Relative links (and #anchors) of README.md and docs/*.md point at files and headings that exist."""
    base = (ROOT / file).parent
    broken = []
    for target in _links(file):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (base / path).resolve() if path else ROOT / file
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{file}: " + "; ".join(broken)


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links("README.md") if t.startswith("docs/")}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert linked, "README.md links no docs/ page"
    assert pages <= linked, f"docs pages the README does not link: {sorted(p.name for p in pages - linked)}"


def _needs(module: str) -> pytest.MarkDecorator:
    """Skip an example whose optional dependency is missing (transformers; sdpa_flash.compat while it is new)."""
    why = _importable(module)
    return pytest.mark.skipif(why is not None, reason=why or f"{module} is importable")


@pytest.mark.parametrize(
    ("script", "args", "code"),
    [("quickstart.py", ["--seq", "64"], None), ("startup_check.py", ["--device", "cpu"], 0),
     ("startup_check.py", ["--require", "cudnn", "--device", "cpu"], 1),
     ("varlen_batching.py", [], None), ("varlen_batching.py", ["--causal", "--batch", "3"], None),
     ("train_tiny_transformer.py", ["--steps", "3"], None), ("fa4_warmup.py", ["--causal"], None),
     pytest.param("hf_transformers.py", [], None, marks=_needs("transformers")),
     pytest.param("flash_attn_dropin.py", [], None, marks=_needs("sdpa_flash.compat"))],
)
def test_example_script_runs(script: str, args: list[str], code: int | None, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    if code is None:
        runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    else:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
        assert exc.value.code == code
    assert capsys.readouterr().out or code == 1


def example_main(script: str) -> Any:
    return runpy.run_path(str(ROOT / "examples" / script), run_name="example")["main"]


def test_train_tiny_transformer_loss_drops(capsys: pytest.CaptureFixture[str]) -> None:
    result = example_main("train_tiny_transformer.py")(["--steps", "30"])
    assert result["last_loss"] < 0.5 * result["first_loss"], result
    assert "attention calls" in capsys.readouterr().out


def test_varlen_batching_routes_agree() -> None:
    result = example_main("varlen_batching.py")(["--causal", "--device", "cpu"])  # float32: exact paths agree
    assert result["nested_err"] < 1e-5 and result["padded_err"] < 1e-5, result


@_needs("transformers")
def test_hf_transformers_example_matches_sdpa() -> None:
    result = example_main("hf_transformers.py")(["--device", "cpu"])
    assert result["max_logit_diff"] < 1e-4 and result["same_tokens"] == 1.0, result


@_needs("sdpa_flash.compat")
def test_flash_attn_dropin_matches_attention() -> None:
    result = example_main("flash_attn_dropin.py")(["--device", "cpu"])
    assert result["dense_err"] < 1e-5 and result["varlen_err"] < 1e-5, result
