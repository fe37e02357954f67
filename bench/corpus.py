"""Real text that installs offline: the docstrings and sources of the Python standard library.

Written by CPython's authors, not by us, and present on every machine with Python. Used as
calibration and held-out text by the benchmarks and the subclone tests.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path


def stdlib_docstrings(max_chars: int = 2_000_000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return docs
    return docs


def sentences(min_words: int = 6, max_chars: int = 2_000_000) -> list[str]:
    """Prose sentences from the docstrings (code examples and short fragments dropped)."""
    found = []
    for doc in stdlib_docstrings(max_chars):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            if len(s.split()) >= min_words and ">>>" not in s and s[0].isupper():
                found.append(s)
    return found


def write_text(path: Path, max_chars: int = 2_000_000) -> Path:
    path.write_text("\n\n".join(stdlib_docstrings(max_chars)))
    return path


def python_sources(site_packages: bool = False) -> list[Path]:
    """The standard library's .py files without its tests (and, if asked, every installed package's)."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if site_packages:
        roots.append(Path(sysconfig.get_paths()["purelib"]))
    files = []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            parts = set(p.relative_to(root).parts)
            if not parts & {"test", "tests"} and (site_packages or "site-packages" not in parts):
                files.append(p)
    return files
