"""The API reference and the examples: every public name is on a reference page with a complete docstring, and the
Python examples of README.md and docs/ run.

`mkdocs build --strict` (CI) fails on a broken reference, a bad docstring section or a missing README section, but
not on a public name left off the pages or documented without its arguments: these tests cover that, and need
neither mkdocs nor network.
"""

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import jaxforget as jf

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_MARKER = "<!-- docs: skip -->"  # on the line before a ```python fence: the block is illustrative or too slow
RUN_SKIPPED = os.environ.get("JAXFORGET_DOCS_RUN_SKIPPED") == "1"  # run the marked blocks too
EXAMPLE_TIMEOUT_S = 300


def _directives() -> list[tuple[str, str, list[str] | None]]:
    """Every ``::: path`` directive under docs/: (page, path, its ``members`` list or None)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"::: (\S+)\s*$", line)
            if not match:
                continue
            members, in_members = None, False
            for option in lines[i + 1 :]:
                if option.strip() and not option.startswith(" "):
                    break
                if re.match(r"\s+members:\s*$", option):
                    members, in_members = [], True
                elif in_members and (item := re.match(r"\s+- (\w+)\s*$", option)):
                    members.append(item.group(1))
                elif option.strip():
                    in_members = False
            found.append((str(page.relative_to(ROOT)), match.group(1), members))
    return found


def _resolve(path: str):
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _documented() -> dict[str, str]:
    """The public names the API pages render, each with the module path its directive names."""
    documented = {}
    for _, path, members in _directives():
        obj = _resolve(path)
        if not inspect.ismodule(obj):
            documented[path.rpartition(".")[2]] = path.rpartition(".")[0]
            continue
        if members is None:  # a whole module: the names of jaxforget.__all__ it holds
            members = [name for name in jf.__all__ if getattr(obj, name, None) is getattr(jf, name)]
        for name in members:
            documented[name] = path
    return documented


def test_every_public_name_is_on_a_reference_page():
    documented = _documented()
    missing = [name for name in jf.__all__ if name not in documented]
    assert not missing, f"public names on no page of docs/api (add them to a `::: module` members list): {missing}"


def test_every_listed_member_exists():
    # mkdocstrings silently skips a members entry that names nothing; a typo would drop a name from the site.
    wrong = []
    for page, path, members in _directives():
        obj = _resolve(path)
        wrong += [f"{page}: {path}.{name}" for name in members or [] if not hasattr(obj, name)]
    assert not wrong, f"members that do not exist: {wrong}"


def _section(doc: str, titles: tuple[str, ...]) -> list[str] | None:
    """The names a Google-style section (``Args:``, ``Attributes:``) documents, or None if there is none."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() in {f"{title}:" for title in titles} and not line.startswith(" "):
            body = []
            for entry in lines[i + 1 :]:
                if entry.strip() and not entry.startswith(" "):
                    break
                body.append(entry)
            entries = [entry for entry in body if entry.strip()]
            if not entries:
                return []
            indent = min(len(entry) - len(entry.lstrip()) for entry in entries)
            names = []
            for entry in entries:
                if len(entry) - len(entry.lstrip()) == indent:
                    match = re.match(r"\s*\**(\w+)(\s*\([^)]*\))?:", entry)
                    names.append(match.group(1) if match else entry.strip())
            return names
    return None


def _own_doc(obj) -> str:
    """The object's own docstring: not inherited, not the signature a dataclass or NamedTuple generates."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not doc or (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")):
        return ""
    return inspect.cleandoc(doc)


def _attribute_has_docstring(module_path: str, name: str) -> bool:
    """Whether ``name = ...`` at the top of the module is followed by a string (an attribute docstring)."""
    module = importlib.import_module(module_path)
    tree = ast.parse(inspect.getsource(module))
    for statement, following in zip(tree.body, tree.body[1:] + [None], strict=True):
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            )
    return False


def _docstring_problems(name: str, module_path: str | None) -> list[str]:
    obj = getattr(jf, name)
    if not (inspect.isclass(obj) or callable(obj)):
        if module_path is None or not _attribute_has_docstring(module_path, name):
            return [f"{name}: a constant without an attribute docstring (a string on the line after it)"]
        return []
    doc = _own_doc(obj)
    if not doc:
        return [f"{name}: no docstring"]
    if inspect.isclass(obj):
        fields = [field for field in obj.__dict__.get("__annotations__", {}) if field not in {"parent", "name"}]
        fields = [field for field in fields if not field.startswith("_")]
        section = _section(doc, ("Attributes", "Args"))
    else:
        fields = [p.name for p in inspect.signature(obj).parameters.values() if p.name not in {"self", "cls"}]
        section = _section(doc, ("Args",))
    if not fields:
        return []
    if section is None:
        kind = "an Attributes" if inspect.isclass(obj) else "an Args"
        return [f"{name}: {kind} section is missing (for {', '.join(fields)})"]
    problems = [f"{name}: `{field}` is not in its Args/Attributes section" for field in fields if field not in section]
    if not inspect.isclass(obj):
        extra = [entry for entry in section if entry not in fields]
        problems += [f"{name}: its Args section names `{entry}`, not a parameter" for entry in extra]
    return problems


def test_every_public_name_has_a_complete_docstring():
    documented = _documented()
    problems = [problem for name in jf.__all__ for problem in _docstring_problems(name, documented.get(name))]
    assert not problems, "docstrings to complete:\n" + "\n".join(problems)


def test_readme_has_the_sections_the_docs_include():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    wanted = {
        section
        for page in DOCS.rglob("*.md")
        for section in re.findall(r'^--8<-- "README\.md:(\w+)"', page.read_text(encoding="utf-8"), re.M)
    }
    missing = [
        section
        for section in sorted(wanted)
        if f"<!-- --8<-- [start:{section}] -->" not in readme or f"<!-- --8<-- [end:{section}] -->" not in readme
    ]
    assert not missing, f"README.md lacks the markers of the sections docs/ includes: {missing}"


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown file, (first line number, code), without the ones marked to skip."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if previous != SKIP_MARKER or RUN_SKIPPED:
                indent = len(lines[i]) - len(lines[i].lstrip())
                blocks.append((start + 1, textwrap.dedent("\n".join(line[indent:] for line in lines[start:end]))))
            i = end
        i += 1
    return blocks


EXAMPLE_FILES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

RUNNER = """
import sys
namespace = {"__name__": "__main__"}
for line, path, code in BLOCKS:
    exec(compile(code, f"{path}, the block from line {line}", "exec"), namespace)
"""


@pytest.mark.parametrize("path", [p for p in EXAMPLE_FILES if _python_blocks(p)], ids=lambda p: p.name)
def test_examples_run(path, tmp_path):
    """The file's Python blocks run in order in one fresh interpreter, as a reader would paste them."""
    blocks = [(line, str(path.relative_to(ROOT)), code) for line, code in _python_blocks(path)]
    script = f"BLOCKS = {blocks!r}\n{RUNNER}"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{path.name}'s examples failed:\n{result.stderr[-4000:]}"


def _modules_with_examples() -> list[str]:
    package = Path(jf.__file__).parent
    return sorted(
        ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in package.rglob("*.py")
        if ">>>" in path.read_text(encoding="utf-8")
    )


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run(module, cli_numerics):
    """The ``>>>`` examples the reference pages show, run as doctests in their module's namespace, with a user's
    numerics (float32, default keys; the rest of the suite runs in float64)."""
    import doctest

    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
