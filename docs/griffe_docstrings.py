"""A griffe extension for the API reference: renders jaxforget's docstrings as Markdown without editing them.

The docstrings are Google style with two reStructuredText habits that Markdown does not know:

- roles such as ``:func:`select_top``` become inline code (`` `select_top` ``);
- a paragraph's closing ``::`` (a literal block follows) becomes ``:``;
- doctest blocks (``>>>`` lines and their output) outside a code fence become ``pycon`` fenced blocks, so that
  Markdown neither reads ``>>>`` as nested block quotes nor ``x["a"]["b"]`` as reference links.

mkdocs.yml loads it with ``extensions: [docs/griffe_docstrings.py]``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|const):`~?([^`]+)`")


def _fence_doctests(text: str) -> str:
    out: list[str] = []
    lines = text.split("\n")
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if in_fence or not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(lines[i])
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += [f"{indent}```pycon", *block, f"{indent}```"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


def markdown_docstring(text: str) -> str:
    """The docstring ``text`` in Markdown: reST roles as inline code, ``::`` as ``:``, doctests in fences."""
    text = re.sub(r"(?<=\S)::$", ":", _ROLE.sub(r"`\1`", text), flags=re.M)
    return _fence_doctests(text)


class MarkdownDocstrings(griffe.Extension):
    """Rewrites every loaded object's docstring with :func:`markdown_docstring` before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
