"""Tests for saekit.data: text sources, splits, the stdlib corpus, tokenization and packing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from saekit.data import (
    HELDOUT_EVERY,
    MAX_DOC_CHARS,
    count_contexts_needed,
    describe_source,
    iter_texts,
    pack_contexts,
    parse_hf_spec,
    select_split,
    special_token_ids,
    stdlib_docstrings,
    tokenize_batch,
)
from saekit.data.stdlib_corpus import MIN_DOC_CHARS
from saekit.models.tiny import byte_tokenizer

BOS, EOS = 0, 1


def write_jsonl(path: Path, rows: list[dict], field: str = "text") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def numbered_docs(n: int) -> list[str]:
    return [f"document number {i} with some words" for i in range(n)]


# ---------------------------------------------------------------- .txt


def test_txt_merges_short_paragraphs_and_keeps_documents_bounded(tmp_path):
    paras = [f"Paragraph {i}.\nIts second line." for i in range(300)]
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    docs = list(iter_texts(path))
    assert 1 < len(docs) < len(paras)  # merged, but not into one document
    assert all(len(d) <= MAX_DOC_CHARS for d in docs)
    # Nothing lost or reordered: the documents re-split give back the paragraphs.
    assert [p for d in docs for p in d.split("\n\n")] == paras


def test_txt_blank_lines_with_whitespace_crlf_bom_and_long_paragraphs(tmp_path):
    long_lines = [f"line {i} " + "x" * 90 for i in range(100)]  # one ≈10 kB paragraph
    text = "\ufeffFirst  \r\n   \r\n" + "\r\n".join(long_lines) + "\r\n\t\r\nLast\r\n"
    path = tmp_path / "b.txt"
    path.write_bytes(text.encode("utf-8"))
    docs = list(iter_texts(path))
    assert docs[0].startswith("First")  # BOM removed
    assert docs[-1].endswith("Last")
    assert all(len(d) <= MAX_DOC_CHARS for d in docs)
    assert len(docs) >= 5  # the ≈10 kB paragraph was cut
    joined = "\n".join(d.replace("\n\n", "\n") for d in docs)
    assert joined.split("\n") == ["First  ", *long_lines, "Last"]
    assert "\r" not in joined


def test_txt_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nstill fine\nbroken \xff here\n")
    with pytest.raises(ValueError, match=r"bad\.txt: line 3 is not valid UTF-8"):
        list(iter_texts(path))


# ---------------------------------------------------------------- .jsonl


def test_jsonl_default_and_custom_field(tmp_path):
    rows = [{"text": "alpha", "body": "one"}, {"text": "beta", "body": "two"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "a", encoding="utf-8") as fh:  # blank lines and empty documents are skipped
        fh.write("\n   \n" + json.dumps({"text": "  ", "body": "three"}) + "\n")
    assert list(iter_texts(path)) == ["alpha", "beta"]
    assert list(iter_texts(path, text_field="body")) == ["one", "two", "three"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "unterminated', r"line 3: invalid JSON"),
        ('{"content": "x"}', r"line 3: no field 'text' \(fields: 'content'\)"),
        ('{"text": 5}', r"line 3: field 'text' is int, not a string"),
        ('["text"]', r"line 3: expected a JSON object, got list"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": "ok"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"e\.jsonl: {message}"):
        list(iter_texts(path))


# ---------------------------------------------------------------- .parquet


def test_parquet_streams_row_groups_in_order(tmp_path):
    texts = [f"row {i}" for i in range(2500)]
    texts[7] = None  # nulls and blanks are skipped
    texts[8] = " "
    table = pa.table({"id": list(range(2500)), "text": texts})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path, row_group_size=600)
    assert pq.ParquetFile(path).num_row_groups == 5
    expected = [t for t in texts if t and t.strip()]
    assert list(iter_texts(path)) == expected


def test_parquet_column_errors(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), path)
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: body, n\)"):
        list(iter_texts(path))
    with pytest.raises(ValueError, match=r"column 'n' has type int64, not string"):
        list(iter_texts(path, text_field="n"))
    assert list(iter_texts(path, text_field="body")) == ["a"]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        list(iter_texts(broken))


# ---------------------------------------------------------------- folders


def test_folder_reads_supported_files_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inner").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("from a.txt", encoding="utf-8")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "from c.jsonl"}])
    pq.write_table(pa.table({"text": ["from d.parquet"]}), tmp_path / "b" / "inner" / "d.parquet")
    (tmp_path / "README.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    (tmp_path / ".y.txt").write_text("ignored", encoding="utf-8")
    assert list(iter_texts(tmp_path)) == ["from a.txt", "from c.jsonl", "from d.parquet"]
    assert list(iter_texts(str(tmp_path))) == list(iter_texts(tmp_path))


def test_folder_without_supported_files(tmp_path):
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no .*txt/.jsonl/.parquet files.*found only: .md"):
        iter_texts(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="it is empty"):
        iter_texts(empty)


def test_unreadable_file_in_folder_names_it(tmp_path):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    os.symlink(tmp_path / "missing-target.txt", tmp_path / "b.txt")  # broken link
    texts = iter_texts(tmp_path)
    assert next(texts) == "fine"
    with pytest.raises(ValueError, match=r"cannot read .*b\.txt"):
        next(texts)


# ---------------------------------------------------------------- bad sources


def test_missing_path_unknown_extension_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*no such file or folder"):
        iter_texts(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.csv.*unsupported file type '.csv'"):
        iter_texts(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        iter_texts("stdlib", "test")
    with pytest.raises(ValueError, match="empty text source"):
        iter_texts("")


@pytest.mark.parametrize(("name", "content"), [("e.txt", ""), ("w.txt", " \n\n\t\n"), ("e.jsonl", "\n")])
def test_empty_sources_raise(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name}.*has no documents"):
        list(iter_texts(path))


def test_heldout_of_a_tiny_source_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", [{"text": t} for t in numbered_docs(HELDOUT_EVERY - 1)])
    assert len(list(iter_texts(path, "train"))) == HELDOUT_EVERY - 1
    with pytest.raises(ValueError, match=r"only 9 document\(s\), so its 'heldout' split .* is empty"):
        list(iter_texts(path, "heldout"))


# ---------------------------------------------------------------- splits


def test_splits_are_disjoint_cover_everything_and_are_deterministic(tmp_path):
    docs = numbered_docs(95)
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in docs])
    train, heldout, everything = (list(iter_texts(path, s)) for s in ("train", "heldout", "all"))
    assert everything == docs
    assert heldout == [docs[i] for i in range(95) if i % 10 == 9]
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(docs)
    assert list(iter_texts(path, "train")) == train
    assert list(select_split(docs, "heldout")) == heldout


def test_split_index_runs_across_files_of_a_folder(tmp_path):
    docs = numbered_docs(30)
    write_jsonl(tmp_path / "1.jsonl", [{"text": t} for t in docs[:7]])
    write_jsonl(tmp_path / "2.jsonl", [{"text": t} for t in docs[7:]])
    assert list(iter_texts(tmp_path, "heldout")) == [docs[9], docs[19], docs[29]]


# ---------------------------------------------------------------- describe_source


def test_describe_source_file_folder_stdlib_hf(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    desc = describe_source(path)
    assert desc["kind"] == "file" and desc["format"] == "jsonl"
    assert desc["size_bytes"] == path.stat().st_size
    assert desc["sha256_prefix"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.txt").write_text("text", encoding="utf-8")
    folder = describe_source(tmp_path)
    assert folder["kind"] == "folder" and folder["n_files"] == 2
    assert [f["path"] for f in folder["files"]] == ["d.jsonl", "sub/t.txt"]
    path.write_text('{"text": "changed"}\n', encoding="utf-8")
    assert describe_source(path)["sha256_prefix"] != desc["sha256_prefix"]
    std = describe_source("stdlib")
    assert std["kind"] == "stdlib" and std["n_files"] > 300
    assert describe_source("hf:org/set::validation") == {
        "kind": "hf",
        "name": "org/set",
        "config": None,
        "split": "validation",
        "text_field": "text",
        "heldout_every": HELDOUT_EVERY,
    }
    for d in (desc, folder, std):
        json.dumps(d)


# ---------------------------------------------------------------- Hugging Face


def test_parse_hf_spec():
    assert parse_hf_spec("hf:org/name") == ("org/name", None, "train")
    assert parse_hf_spec("hf:name:cfg") == ("name", "cfg", "train")
    assert parse_hf_spec("hf:name:cfg:test") == ("name", "cfg", "test")
    for bad in ("hf:", "hf::cfg", "hf:a:b:c:d"):
        with pytest.raises(ValueError, match="expected hf:NAME"):
            parse_hf_spec(bad)


def test_hf_source_streams_rows_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": f"row {i}", "meta": i} for i in range(20)] + [{"meta": 99}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    texts = iter_texts("hf:org/set:cfg:validation", "heldout")
    assert calls == [("org/set", "cfg", "validation", True)]
    assert [next(texts), next(texts)] == ["row 9", "row 19"]
    with pytest.raises(ValueError, match=r"row 20 has no field 'text'"):
        next(texts)


def test_hf_source_offline_fails_fast_with_a_clear_error():
    # A subprocess, so the offline variables are read when datasets/huggingface_hub are first imported.
    code = (
        "from saekit.data import iter_texts\n"
        "try:\n"
        "    iter_texts('hf:saekit-no-such-user/no-such-dataset-7f3a')\n"
        "except ValueError as e:\n"
        "    print('ERROR:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR:" in out.stdout
    assert "no-such-dataset-7f3a" in out.stdout and "local datasets cache" in out.stdout
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------- stdlib corpus


@pytest.fixture(scope="module")
def stdlib_docs() -> list[str]:
    return list(stdlib_docstrings())  # one full pass (≈3 s); later passes come from memory


def test_stdlib_corpus_is_a_real_amount_of_prose(stdlib_docs):
    n_bytes = sum(len(d.encode()) for d in stdlib_docs)
    assert n_bytes >= 500_000
    assert len(stdlib_docs) >= 2000
    assert len(set(stdlib_docs)) == len(stdlib_docs)
    assert min(len(d) for d in stdlib_docs) >= MIN_DOC_CHARS
    assert any(
        d.startswith("JSON (JavaScript Object Notation) <https://json.org> is a subset") for d in stdlib_docs
    )
    assert all(d == d.strip() for d in stdlib_docs)
    assert list(stdlib_docstrings()) == stdlib_docs  # deterministic (and cached)
    heldout = list(iter_texts("stdlib", "heldout"))
    assert heldout == stdlib_docs[HELDOUT_EVERY - 1 :: HELDOUT_EVERY]


def test_stdlib_walker_rules_on_a_fake_library(tmp_path):
    long = "x" * MIN_DOC_CHARS
    (tmp_path / "mod.py").write_text(
        f'"""Module {long}"""\n'
        "import sys\n"
        "if sys:\n"
        "    class A:\n"
        f'        """Class A {long}"""\n'
        "        def f(self):\n"
        f'            """Method f {long}"""\n'
        "try:\n"
        "    pass\n"
        "except Exception:\n"
        "    async def g():\n"
        f'        """Coroutine g {long}"""\n'
        "def short():\n"
        '    """Too short."""\n'
        "def dup():\n"
        f'    """Module {long}"""\n'
        f'x = """not a docstring {long}"""\n',
        encoding="utf-8",
    )
    (tmp_path / "broken.py").write_text(f'"""Broken {long}"""\ndef (:\n', encoding="utf-8")
    (tmp_path / "test_mod.py").write_text(f'"""Test {long}"""\n', encoding="utf-8")
    for skipped in ("test", "site-packages", "encodings"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "m.py").write_text(f'"""Skipped {long}"""\n', encoding="utf-8")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(f'"""Package {long}"""\n', encoding="utf-8")
    docs = list(stdlib_docstrings(tmp_path))
    assert [d.removesuffix(long).strip() for d in docs] == [
        "Module",
        "Class A",
        "Method f",
        "Coroutine g",
        "Package",
    ]


# ---------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def stream_of(tok, texts: list[str]) -> list[int]:
    stream: list[int] = []
    for ids in tokenize_batch(tok, texts):
        stream += [*ids, EOS] if ids else []
    return stream


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_pack_contexts_reassembles_the_token_stream(tok, prepend_bos):
    texts = [f"Doc {i}: " + "lorem ipsum " * (i % 7) for i in range(50)] + ["", "tail"]
    ctx_len = 16
    contexts = list(pack_contexts(texts, tok, ctx_len, prepend_bos=prepend_bos, batch_docs=8))
    stream = stream_of(tok, texts)
    body = ctx_len - 1 if prepend_bos else ctx_len
    assert len(contexts) == len(stream) // body  # final partial context dropped
    assert all(c.shape == (ctx_len,) and c.dtype == torch.long for c in contexts)
    if prepend_bos:
        assert all(int(c[0]) == BOS for c in contexts)
        bodies = [c[1:] for c in contexts]
    else:
        bodies = contexts
    assert torch.cat(bodies).tolist() == stream[: len(contexts) * body]
    # One EOS after each non-empty document, none elsewhere (byte text never maps to EOS).
    n_eos = sum(int((b == EOS).sum()) for b in bodies)
    assert n_eos == stream[: len(contexts) * body].count(EOS)
    assert BOS not in torch.cat(bodies).tolist()


def test_pack_contexts_is_deterministic_and_independent_of_batching(tok):
    texts = [f"text number {i} " * (1 + i % 5) for i in range(40)]
    a = torch.stack(list(pack_contexts(texts, tok, 32, batch_docs=1)))
    b = torch.stack(list(pack_contexts(iter(texts), tok, 32, batch_docs=64)))
    c = torch.stack(list(pack_contexts(texts, tok, 32, batch_docs=7)))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_special_token_text_in_documents_stays_text(tok):
    (ctx,) = pack_contexts(["say <s> and </s> literally!"], tok, 29)
    assert int(ctx[0]) == BOS
    assert ctx[1:].tolist().count(BOS) == 0
    assert ctx[1:].tolist().count(EOS) == 1 and int(ctx[-1]) == EOS
    assert tok.decode(ctx[1:-1].tolist()) == "say <s> and </s> literally!"


def test_no_warning_about_documents_longer_than_model_max_length(tok):
    small = byte_tokenizer()
    small.model_max_length = 8
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        contexts = list(pack_contexts(["a long document " * 10], small, 8))
        assert len(contexts) == 161 // 7
        assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]
        small(["a long document " * 10], add_special_tokens=False)  # the warning the test guards against
        assert [r for r in records if "longer than the specified maximum" in r.getMessage()]
    finally:
        logger.removeHandler(handler)


def test_tokenizer_without_bos_or_eos_warns_and_falls_back():
    no_bos = byte_tokenizer()
    no_bos.bos_token = None
    with pytest.warns(UserWarning, match="no BOS token"):
        contexts = list(pack_contexts(["abcdefgh"] * 2, no_bos, 4))
    assert torch.cat(contexts).tolist() == stream_of(no_bos, ["abcdefgh"] * 2)[:16]
    no_eos = byte_tokenizer()
    no_eos.eos_token = None
    with pytest.warns(UserWarning, match="no EOS token"):
        contexts = list(pack_contexts(["abc", "def"], no_eos, 7))
    assert contexts[0].tolist() == [BOS, *tokenize_batch(no_eos, ["abcdef"])[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(pack_contexts(["abc"], byte_tokenizer(), 2))  # a complete tokenizer: no warning


def test_pack_contexts_argument_errors(tok):
    with pytest.raises(ValueError, match="context_len must be >= 2"):
        pack_contexts(["x"], tok, 1)
    with pytest.raises(ValueError, match="batch_docs must be >= 1"):
        pack_contexts(["x"], tok, 8, batch_docs=0)
    assert len(list(pack_contexts(["xyz"], tok, 1, prepend_bos=False))) == 4


def test_special_token_ids_and_context_count(tok):
    assert special_token_ids(tok) == {0, 1, 2}
    assert count_contexts_needed(0, 128) == 0
    assert count_contexts_needed(1000, 128) == 8
    assert count_contexts_needed(1016, 128, skip_first=1) == 8
    assert count_contexts_needed(1017, 128, skip_first=1) == 9
    with pytest.raises(ValueError):
        count_contexts_needed(10, 1, skip_first=1)


def test_pack_stdlib_end_to_end(tok, stdlib_docs):
    from itertools import islice

    contexts = list(islice(pack_contexts(iter_texts("stdlib", "train"), tok, 128), 50))
    assert len(contexts) == 50
    text = tok.decode(torch.cat([c[1:] for c in contexts]).tolist(), skip_special_tokens=True)
    train_docs = list(select_split(stdlib_docs, "train"))
    assert text[:-4] == "".join(train_docs)[: len(text) - 4]
