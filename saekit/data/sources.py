"""Text sources: one string names where documents come from; `iter_texts` streams them.

A source is one of
- ``"stdlib"``: the built-in corpus of standard-library docstrings (`stdlib_corpus`);
- a local path: a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a folder searched recursively for such
  files (sorted by relative path; hidden files and other extensions are ignored, so a README beside
  the data is fine). A local file literally named ``stdlib`` can be given as ``./stdlib``;
- ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face dataset, streamed (`datasets` is imported only here).

Documents per format:
- ``.txt``: paragraphs are blocks of lines separated by blank (or whitespace-only) lines. Consecutive
  paragraphs are merged, joined by a blank line, while the document stays within `MAX_DOC_CHARS`
  characters, so that short paragraphs (a line of dialogue, a heading) don't become tiny documents; a
  paragraph longer than that is cut at line boundaries (a single longer line stays whole). Files are
  read line by line, so size is no problem.
- ``.jsonl``: one JSON object per non-blank line, text in `text_field` (default ``"text"``).
- ``.parquet``: the string column `text_field`, read in record batches so big files stream.
Documents that are empty or only whitespace are dropped everywhere and not counted.

Splits are deterministic and disjoint: ``"heldout"`` is every `HELDOUT_EVERY`-th document (index % 10
== 9, counted over the whole source in order), ``"train"`` the others, ``"all"`` everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from saekit.data.stdlib_corpus import describe_stdlib, stdlib_docstrings

SPLITS = ("all", "train", "heldout")
HELDOUT_EVERY = 10
MAX_DOC_CHARS = 2000
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
HF_PREFIX = "hf:"
_PARQUET_BATCH_ROWS = 1024


# ---------------------------------------------------------------- public API


def iter_texts(source: str | os.PathLike, split: str = "all", *, text_field: str = "text") -> Iterator[str]:
    """Stream the documents of `source` (see the module docstring) that belong to `split`.

    The source spec, the path and the split are checked now; problems inside files (bad JSON, a missing
    field, invalid UTF-8, no documents at all) are raised while iterating, naming file and line.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    spec = str(source)
    docs = _open_source(spec, text_field)
    return _split_and_check(docs, split, spec)


def describe_source(source: str | os.PathLike, *, text_field: str = "text") -> dict:
    """A JSON-able description of `source` to record in cache manifests (kind, path or name, and for
    files their size and a sha256 prefix of their content), so a cache can tell what it was built from.
    The document rules that decide the train/held-out split (`HELDOUT_EVERY`, `MAX_DOC_CHARS`) are
    included, since changing them changes which documents are held out.
    """
    spec = str(source)
    rules = {"heldout_every": HELDOUT_EVERY}
    if spec == "stdlib":
        return {**describe_stdlib(), **rules}
    if spec.startswith(HF_PREFIX):
        name, config, hf_split = parse_hf_spec(spec)
        return {
            "kind": "hf",
            "name": name,
            "config": config,
            "split": hf_split,
            "text_field": text_field,
            **rules,
        }
    path = _existing_path(spec)
    rules.update(text_field=text_field, max_doc_chars=MAX_DOC_CHARS)
    if path.is_dir():
        files = _folder_files(path, spec)
        entries = [_describe_file(f, rel=f.relative_to(path).as_posix()) for f in files]
        return {
            "kind": "folder",
            "path": str(path.resolve()),
            "n_files": len(entries),
            "total_bytes": sum(e["size_bytes"] for e in entries),
            **rules,
            "files": entries,
        }
    _file_format(path, spec)
    return {"kind": "file", **_describe_file(path, rel=str(path.resolve())), **rules}


def select_split(docs: Iterable[str], split: str) -> Iterator[str]:
    """Keep the documents of `split`: heldout = index % HELDOUT_EVERY == HELDOUT_EVERY - 1."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    for i, doc in enumerate(docs):
        if _in_split(i, split):
            yield doc


def _in_split(index: int, split: str) -> bool:
    if split == "all":
        return True
    return (split == "heldout") == (index % HELDOUT_EVERY == HELDOUT_EVERY - 1)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``"hf:NAME[:CONFIG][:SPLIT]"`` -> (name, config or None, split, default ``"train"``)."""
    parts = spec[len(HF_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"bad Hugging Face source {spec!r}; expected hf:NAME[:CONFIG][:SPLIT]")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    hf_split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, hf_split


# ---------------------------------------------------------------- dispatch


def _open_source(spec: str, text_field: str) -> Iterator[str]:
    if not spec:
        raise ValueError("empty text source; give 'stdlib', a path, or hf:NAME[:CONFIG][:SPLIT]")
    if spec == "stdlib":
        return stdlib_docstrings()
    if spec.startswith(HF_PREFIX):
        return _hf_documents(spec, text_field)
    path = _existing_path(spec)
    if path.is_dir():
        files = _folder_files(path, spec)
        return (doc for f in files for doc in _file_documents(f, FORMATS[f.suffix.lower()], text_field, spec))
    return _file_documents(path, _file_format(path, spec), text_field, spec)


def _split_and_check(docs: Iterator[str], split: str, spec: str) -> Iterator[str]:
    n_docs = n_kept = 0
    for i, doc in enumerate(docs):
        n_docs = i + 1
        if _in_split(i, split):
            n_kept += 1
            yield doc
    if n_docs == 0:
        raise ValueError(f"text source {spec!r} has no documents (empty, or only whitespace)")
    if n_kept == 0:
        raise ValueError(
            f"text source {spec!r} has only {n_docs} document(s), so its {split!r} split (every "
            f"{HELDOUT_EVERY}th document) is empty; give a source with at least {HELDOUT_EVERY} documents"
        )


def _existing_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"text source {spec!r}: no such file or folder (expected 'stdlib', a .txt/.jsonl/.parquet "
            "file or folder, or hf:NAME[:CONFIG][:SPLIT])"
        )
    return path


def _file_format(path: Path, spec: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"text source {spec!r}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"supported: {', '.join(FORMATS)}"
        )
    return fmt


def _folder_files(folder: Path, spec: str) -> list[Path]:
    """Supported files under `folder`, recursively, sorted by relative path; hidden entries skipped."""
    found: list[Path] = []
    others: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath, name)
            if p.suffix.lower() in FORMATS:
                found.append(p)
            else:
                others.add(p.suffix or "(no extension)")
    if not found:
        seen = f" (found only: {', '.join(sorted(others))})" if others else " (it is empty)"
        raise ValueError(f"text source {spec!r}: no {'/'.join(FORMATS)} files in this folder{seen}")
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _describe_file(path: Path, rel: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return {
        "path": rel,
        "format": FORMATS[path.suffix.lower()],
        "size_bytes": path.stat().st_size,
        "sha256_prefix": digest.hexdigest()[:16],
    }


# ---------------------------------------------------------------- readers


def _file_documents(path: Path, fmt: str, text_field: str, spec: str) -> Iterator[str]:
    try:
        if fmt == "txt":
            yield from _txt_documents(path)
        elif fmt == "jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _parquet_documents(path, text_field)
    except FileNotFoundError as exc:  # vanished, or a broken link inside a folder
        raise ValueError(f"text source {spec!r}: cannot read {path}: file not found") from exc
    except OSError as exc:
        raise ValueError(f"text source {spec!r}: cannot read {path}: {exc.strerror or exc}") from exc


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line ending); invalid UTF-8 is an error naming the line.

    Lines are read as bytes and decoded one by one so the line number in an error is exact.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}: line {lineno} is not valid UTF-8 (byte {exc.start}: {exc.reason}); "
                    "convert the file to UTF-8"
                ) from exc
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # byte-order mark
            yield lineno, line.rstrip("\r\n")


def _txt_documents(path: Path, max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Paragraph-merged documents (see the module docstring); memory stays around `max_chars`."""
    doc: list[str] = []  # pieces of the document being built, joined by a blank line
    doc_chars = 0
    piece: list[str] = []  # lines of the current paragraph (or of its current cut)
    piece_chars = 0

    def add_piece() -> Iterator[str]:
        nonlocal doc, doc_chars, piece, piece_chars
        text = "\n".join(piece)
        piece, piece_chars = [], 0
        if doc and doc_chars + 2 + len(text) > max_chars:
            yield "\n\n".join(doc)
            doc, doc_chars = [], 0
        doc_chars += len(text) + (2 if doc else 0)
        doc.append(text)

    for _, line in _lines(path):
        if not line.strip():  # a blank line ends the paragraph
            if piece:
                yield from add_piece()
            continue
        if piece and piece_chars + 1 + len(line) > max_chars:  # cut an over-long paragraph
            yield from add_piece()
        piece_chars += len(line) + (1 if piece else 0)
        piece.append(line)
    if piece:
        yield from add_piece()
    if doc:
        yield "\n\n".join(doc)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            keys = ", ".join(map(repr, list(record)[:10])) or "none"
            raise ValueError(f"{path}: line {lineno}: no field {text_field!r} (fields: {keys})")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{path}: line {lineno}: field {text_field!r} is {type(text).__name__}, not a string"
            )
        if text.strip():
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as exc:
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from exc
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    col_type = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type) or is_view(col_type)):
        raise ValueError(f"{path}: column {text_field!r} has type {col_type}, not string")
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None and text.strip():
                yield text


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    name, config, hf_split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"text source {spec!r} needs the 'datasets' package: pip install 'saekit[hf]'"
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=hf_split, streaming=True)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        raise ValueError(
            f"text source {spec!r}: could not open Hugging Face dataset {name!r} (config {config!r}, split "
            f"{hf_split!r}): {type(exc).__name__}: {exc}. Either it is not in the local datasets cache and "
            "the hub can't be reached, or no such dataset/config/split exists. Without network, set "
            "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 to fail fast instead of retrying."
        ) from exc
    return _hf_rows(ds, spec, text_field)


def _hf_rows(ds: Iterable[dict], spec: str, text_field: str) -> Iterator[str]:
    for i, row in enumerate(ds):
        if text_field not in row:
            raise ValueError(
                f"text source {spec!r}: row {i} has no field {text_field!r} (fields: {list(row)})"
            )
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield text
