"""Writing an output folder atomically: fill a temporary sibling, then rename it into place.

Feature records and reports are folders of many files; a run killed halfway must not leave a folder that
looks complete, and re-running must not mix old and new files. Used by :mod:`saekit.analysis.records` and
:mod:`saekit.analysis.report`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replacing_folder(path: str | Path, marker: str) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds, it becomes ``path``.

    An existing ``path`` is replaced only if it holds the file ``marker`` (it is one of ours), otherwise
    FileExistsError. The folder gets the permissions of an ordinary new folder (``mkdtemp`` makes it 0700).
    """
    path = Path(path)
    if path.exists() and not (path / marker).exists():
        raise FileExistsError(
            f"refusing to replace {path}: it exists and has no {marker} (not written by saekit)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        mask = _umask()
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
