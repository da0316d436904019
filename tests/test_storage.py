from __future__ import annotations

import pytest

from bft.config import StorageConfig
from bft.storage import Storage, StorageError, detect_format, join

STORAGE = Storage(StorageConfig())


def test_join_and_formats():
    assert join("s3://b/runs/", "/r1/", "sft") == "s3://b/runs/r1/sft"
    assert [detect_format(p) for p in ("a.jsonl.gz", "b.json", "c.PARQUET", "d.txt")] == [
        "jsonl", "jsonl", "parquet", None]


def test_listing_is_sorted_and_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.jsonl", "1.jsonl", "b/0.parquet"):
        (tmp_path / name).write_text("x")
    assert STORAGE.list_files(str(tmp_path)) == sorted(str(tmp_path / n) for n in ("1.jsonl", "b/0.parquet", "b/2.jsonl"))
    assert STORAGE.list_files(str(tmp_path / "missing")) == []


def test_unwritable_output_names_uri_and_cause(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=rf"{blocker}/runs: cannot write there"):
        STORAGE.check_writable(str(blocker / "runs"))
    STORAGE.check_writable(str(tmp_path / "new" / "runs"))  # a fresh folder is fine
    assert not list((tmp_path / "new" / "runs").iterdir())  # and the probe is gone


def test_storage_pickles_without_a_live_client():
    import pickle

    storage = Storage(StorageConfig(endpoint_url="http://127.0.0.1:1"))
    storage.fs("s3://bucket/key")  # creates the client
    assert pickle.loads(pickle.dumps(storage)).config.endpoint_url == "http://127.0.0.1:1"


def test_listing_leaves_out_half_written_files(tmp_path):
    from bft.config import StorageConfig
    from bft.storage import Storage

    storage = Storage(StorageConfig())
    storage.write_bytes(str(tmp_path / "a.json"), b"{}")
    (tmp_path / "b.json.tmp-0123abcd").write_bytes(b"{hal")  # what a killed writer leaves
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / "a.json")]
