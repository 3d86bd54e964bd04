"""The built-in corpus: docstrings of the running Python's standard library.

Every Python installation ships its standard library as source, and its docstrings are ≈1.7 MB of
real English prose mixed with code examples: enough to train and evaluate a small SAE with no download
and no data files. The source files are parsed with `ast` and never imported (importing would run
code, open windows for tkinter/turtle, and differ between platforms).

What is kept: module, class and function docstrings (cleaned with `inspect.cleandoc`) of at least
`MIN_DOC_CHARS` characters, in a deterministic order (sorted paths, then source order), with exact
duplicates dropped (the same docstring repeated in `_pyio` and `io`, in overrides, ...), so that the
train/held-out split never shares a document. What is skipped: third-party packages (site-packages),
test suites and test data, the generated codec modules in `encodings` (one boilerplate docstring each),
`pydoc_data` (a big table of strings with no docstrings) and files that fail to parse.

A full pass parses ≈800 files (≈2.5 s on one core); the result is kept in memory (≈2 MB), so later
passes in the same process are instant.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

MIN_DOC_CHARS = 40

# Folder names skipped anywhere under the stdlib root.
SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "__phello__",
        "lib-dynload",
        "encodings",
        "pydoc_data",
    }
)

_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_cache: dict[str, tuple[str, ...]] = {}


def stdlib_root() -> Path:
    """Folder holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _skip_dir(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith((".", "config-"))


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The .py files the corpus is read from, sorted by their path relative to `root`."""
    root = stdlib_root() if root is None else root
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath, name))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _parse(path: Path) -> ast.Module | None:
    """Parse one file, or None if it can't be read or parsed (e.g. syntax for a newer Python)."""
    try:
        source = path.read_bytes()
    except OSError:
        return None
    # The cyclic GC is pure overhead while ast builds ~10^5 acyclic nodes; disabling it for the call
    # halves the time of a full pass.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError):
        return None
    finally:
        if was_enabled:
            gc.enable()


def _docstrings(stmts: list[ast.AST]) -> Iterator[str]:
    """Docstrings of the definitions in a statement list, in source order.

    Only statement lists are visited (bodies of defs, if/try/with/for/while/match blocks): docstrings
    can't occur inside expressions, and skipping them makes the walk several times faster than
    `ast.walk`.
    """
    for node in stmts:
        if isinstance(node, _DEFS):  # a Module only at the top level
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc.strip()  # cleandoc keeps a last line of spaces: '"""Text.\n    """'
            yield from _docstrings(node.body)
            continue
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                yield from _docstrings(block)
        for handler in getattr(node, "handlers", ()):
            yield from _docstrings(handler.body)
        for case in getattr(node, "cases", ()):
            yield from _docstrings(case.body)


def _file_docstrings(path: Path) -> Iterator[str]:
    tree = _parse(path)
    if tree is None:
        return
    yield from _docstrings([tree])


def stdlib_docstrings(root: Path | None = None) -> Iterator[str]:
    """Yield the standard library's docstrings (≥ `MIN_DOC_CHARS` characters, deduplicated), in order.

    The first complete pass streams from the parser; once a pass has finished, its result is cached
    for this process and later calls yield from memory.
    """
    root = stdlib_root() if root is None else Path(root)
    key = str(root)
    if key in _cache:
        yield from _cache[key]
        return
    seen: set[str] = set()
    docs: list[str] = []
    for path in stdlib_files(root):
        for doc in _file_docstrings(path):
            if len(doc) < MIN_DOC_CHARS or doc in seen:
                continue
            seen.add(doc)
            docs.append(doc)
            yield doc
    _cache[key] = tuple(docs)


def describe_stdlib(root: Path | None = None) -> dict:
    """JSON-able identity of the built-in corpus, for cache manifests.

    The fingerprint hashes the sorted (relative path, size) listing of the files read: cheap, and the
    same for two installations of the same Python version, different when the library changes.
    """
    root = stdlib_root() if root is None else Path(root)
    files = stdlib_files(root)
    listing = hashlib.sha256()
    for path in files:
        listing.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return {
        "kind": "stdlib",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "n_files": len(files),
        "listing_sha256_prefix": listing.hexdigest()[:16],
        "min_doc_chars": MIN_DOC_CHARS,
    }
