"""The shard layer: atomic shards, manifest last, checksums verified on read."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from pipeline.shards import (
    MANIFEST,
    ShardError,
    ShardWriter,
    config_hash,
    read_rows,
    read_table,
    shard_files,
    write_shards,
)

SCHEMA = pa.schema([("id", pa.string()), ("n", pa.int64()), ("tags", pa.list_(pa.string()))])


def _rows(k: int) -> list[dict]:
    return [{"id": f"q{i}", "n": i, "tags": ["a"] * (i % 3)} for i in range(k)]


def test_write_and_read_roundtrip(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path / "out", _rows(25), SCHEMA, {"seed": 1}, shard_size=10)
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 5]
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert manifest["num_rows"] == 25 and manifest["config"] == {"seed": 1}
    assert manifest["schema_version"] == 1 and all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert read_rows(tmp_path / "out") == _rows(25)
    # no temporary files are left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]


def test_shards_load_with_datasets(tmp_path: Path) -> None:
    write_shards(tmp_path / "out", _rows(12), SCHEMA, {}, shard_size=5)
    first = datasets.Dataset.from_file(str(tmp_path / "out" / "shard-00000.arrow"))
    assert first.num_rows == 5 and first[0]["id"] == "q0"
    files = [str(p) for p in shard_files(tmp_path / "out")]
    ds = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 12 and ds["n"] == list(range(12))


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    write_shards(tmp_path / "out", _rows(3), SCHEMA, {})
    (tmp_path / "out" / MANIFEST).unlink()
    with pytest.raises(ShardError, match=r"out: incomplete output, no manifest.json"):
        read_table(tmp_path / "out")


def test_flipped_byte_is_refused_naming_the_shard(tmp_path: Path) -> None:
    write_shards(tmp_path / "out", _rows(30), SCHEMA, {}, shard_size=10)
    shard = tmp_path / "out" / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"out: shard shard-00001.arrow is corrupted"):
        read_table(tmp_path / "out")


def test_missing_folder_and_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="does not exist"):
        read_table(tmp_path / "nope")
    write_shards(tmp_path / "out", _rows(20), SCHEMA, {}, shard_size=10)
    (tmp_path / "out" / "shard-00000.arrow").unlink()
    with pytest.raises(ShardError, match="shard-00000.arrow listed in the manifest is missing"):
        read_table(tmp_path / "out")


def test_empty_output_still_has_schema(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path / "out", [], SCHEMA, {})
    assert manifest["num_rows"] == 0
    assert read_table(tmp_path / "out").schema.equals(SCHEMA)


def test_resume_keeps_shards_only_for_the_same_config(tmp_path: Path) -> None:
    out = tmp_path / "out"
    w = ShardWriter(out, SCHEMA, {"t": 1}, resume=True)
    w.write(_rows(4))
    # crash: no close(), so no manifest; the complete shard stays
    assert not (out / MANIFEST).exists()
    with pytest.raises(ShardError, match="incomplete output"):
        read_table(out)
    w2 = ShardWriter(out, SCHEMA, {"t": 1}, resume=True)
    assert [p.name for p in w2.resumed_shards] == ["shard-00000.arrow"]
    assert sum(t.num_rows for t in w2.existing_tables()) == 4
    w2.write(_rows(2))
    assert w2.close()["num_rows"] == 6
    # a changed config starts clean
    w3 = ShardWriter(out, SCHEMA, {"t": 2}, resume=True)
    assert w3.resumed_shards == [] and shard_files(out) == []


def test_rewrite_removes_stale_shards(tmp_path: Path) -> None:
    write_shards(tmp_path / "out", _rows(30), SCHEMA, {}, shard_size=10)
    write_shards(tmp_path / "out", _rows(5), SCHEMA, {}, shard_size=10)
    assert len(shard_files(tmp_path / "out")) == 1
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["num_rows"] == 5


def test_config_hash_ignores_key_order() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_resume_drops_a_corrupted_shard_and_renumbers_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    w = ShardWriter(out, SCHEMA, {"t": 1}, resume=True)
    for k in range(3):
        w.write(_rows(k + 1))  # 1, 2 and 3 rows; then "killed": no close()
    data = bytearray((out / "shard-00001.arrow").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "shard-00001.arrow").write_bytes(bytes(data))
    w2 = ShardWriter(out, SCHEMA, {"t": 1}, resume=True)
    assert list(w2.rejected) == ["shard-00001.arrow"] and "corrupted" in w2.rejected["shard-00001.arrow"]
    assert [p.name for p in w2.resumed_shards] == ["shard-00000.arrow", "shard-00001.arrow"]
    assert [t.num_rows for t in w2.existing_tables()] == [1, 3]  # the old shard-00002 is now shard-00001
    w2.write(_rows(2))
    manifest = w2.close()
    assert [s["rows"] for s in manifest["shards"]] == [1, 3, 2]
    assert read_table(out).num_rows == 6


def test_close_refuses_a_shard_changed_during_the_run(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "out", SCHEMA, {})
    path = w.write(_rows(5))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ShardError, match="shard shard-00000.arrow changed after it was written"):
        w.close()
    assert not (tmp_path / "out" / MANIFEST).exists()
