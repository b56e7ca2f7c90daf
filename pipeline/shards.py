"""Arrow shard folders: the on-disk contract between stages.

A stage output folder holds ``shard-00000.arrow``, ``shard-00001.arrow``, ... (Arrow IPC
*stream* format, which is what ``datasets.Dataset.from_file`` memory-maps) and a
``manifest.json`` written last. A folder without a manifest is incomplete and is refused.

Every file is written under a temporary name and renamed into place, so a crash never
leaves a half-written shard under a final name. Resumable writers (``generate``) keep the
complete shards of an interrupted run when the run's config hash is unchanged: the hash
is recorded in ``_run.json`` when the run starts, before any shard, and each shard's row
count and sha256 are added to it as soon as the shard is complete. On resume a shard is
kept only if its bytes still match that record; a changed, truncated or unrecorded shard
is deleted (and logged) so that its rows are generated again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RUN_MARKER = "_run.json"
_SHARD_RE = re.compile(r"^shard-(\d{5})\.arrow$")

log = logging.getLogger("mind.shards")


class ShardError(RuntimeError):
    """An output folder is missing, incomplete or corrupted."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """A short, stable hash of a resolved config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def shard_files(out_dir: Path) -> list[Path]:
    """Complete shard files (final names only) in index order."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _SHARD_RE.match(p.name))


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path: Path) -> pa.Table:
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:  # truncated or garbled: say which file
        raise ShardError(f"{path}: shard does not parse as Arrow: {e}") from e


class ShardWriter:
    """Writes one stage output folder shard by shard, manifest last.

    ``resume=False`` clears the folder first. ``resume=True`` keeps the complete shards
    of an earlier run whose ``_run.json`` carries the same config hash, and clears the
    folder otherwise (a changed parameter starts clean). A kept shard must match the row
    count and sha256 that ``_run.json`` recorded when it was written; one that does not
    (or was never recorded) is deleted and listed in ``rejected``, so the caller
    regenerates its rows. The survivors are renumbered to close the gaps.
    """

    def __init__(
        self,
        out_dir: Path,
        schema: pa.Schema,
        config: dict[str, Any],
        *,
        resume: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.config = config
        self.hash = config_hash(config)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        marker = self.out_dir / RUN_MARKER
        state: dict[str, Any] = {}
        if resume and marker.exists():
            try:
                state = json.loads(marker.read_text())
            except json.JSONDecodeError:
                log.warning("%s: unreadable %s; starting clean", self.out_dir, RUN_MARKER)
        kept = state.get("config_hash") == self.hash
        # The manifest goes first: from now on the folder is incomplete until close().
        (self.out_dir / MANIFEST).unlink(missing_ok=True)
        for p in self.out_dir.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                p.unlink()
            elif not kept and _SHARD_RE.match(p.name):
                p.unlink()
        self.rejected: dict[str, str] = {}  # shard name -> why it was not kept
        self.recorded: list[dict[str, Any]] = []  # {file, rows, sha256} of every complete shard, in order
        if kept:
            self._keep_verified(state.get("shards", []))
        self._save_state()
        self.resumed_shards: list[Path] = [self.out_dir / e["file"] for e in self.recorded]
        self._next = len(self.recorded)

    def _keep_verified(self, recorded: list[dict[str, Any]]) -> None:
        """Keep the shards whose bytes match their record; delete the rest; renumber."""
        by_name = {e["file"]: e for e in recorded}
        present = {p.name for p in shard_files(self.out_dir)}
        good: list[dict[str, Any]] = []
        for name in sorted(present | set(by_name)):
            entry, path = by_name.get(name), self.out_dir / name
            if name not in present:
                self.rejected[name] = "missing"
            elif entry is None:
                self.rejected[name] = "not recorded as complete"
            elif (digest := sha256_file(path)) != entry["sha256"]:
                self.rejected[name] = f"corrupted (sha256 {digest[:12]}… != recorded {entry['sha256'][:12]}…)"
            else:
                good.append(entry)
                continue
            path.unlink(missing_ok=True)
            log.warning("%s: resume: shard %s is %s; its rows will be generated again",
                        self.out_dir, name, self.rejected[name])
        for i, entry in enumerate(good):
            if entry["file"] != shard_name(i):
                os.replace(self.out_dir / entry["file"], self.out_dir / shard_name(i))
            self.recorded.append({**entry, "file": shard_name(i)})

    def _save_state(self) -> None:
        atomic_write_json(self.out_dir / RUN_MARKER, {"config_hash": self.hash, "schema_version": SCHEMA_VERSION,
                                                      "shards": self.recorded})

    def existing_tables(self) -> Iterator[pa.Table]:
        """Tables of the shards kept from an interrupted run with the same config."""
        for p in self.resumed_shards:
            yield read_shard(p)

    def write(self, rows: list[dict[str, Any]] | pa.Table) -> Path:
        """Write one shard atomically and return its path."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.schema)
        table = table.cast(self.schema)
        path = self.out_dir / shard_name(self._next)
        _write_table(path, table)
        # Recorded only once the shard is complete under its final name: a kill before this
        # line leaves an unrecorded shard, which a resume deletes rather than trusts.
        self.recorded.append({"file": path.name, "rows": table.num_rows, "sha256": sha256_file(path)})
        self._save_state()
        self._next += 1
        return path

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the manifest (last) and return it.

        The manifest's checksums are the ones recorded when each shard was written, and each
        file is checked against them first: a shard changed during the run is refused, never
        blessed with a fresh checksum."""
        on_disk = [p.name for p in shard_files(self.out_dir)]
        if on_disk != [e["file"] for e in self.recorded]:
            raise ShardError(f"{self.out_dir}: shards on disk {on_disk} differ from the ones this run wrote or kept")
        shards = []
        for entry in self.recorded:
            p = self.out_dir / entry["file"]
            if sha256_file(p) != entry["sha256"]:
                raise ShardError(f"{self.out_dir}: shard {entry['file']} changed after it was written")
            table = read_shard(p)
            if not table.schema.equals(self.schema):
                raise ShardError(f"{p}: schema differs from the writer's schema")
            shards.append(dict(entry))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "num_rows": sum(s["rows"] for s in shards),
            "shards": shards,
            "columns": self.schema.names,
            "config_hash": self.hash,
            "config": self.config,
        }
        if extra:
            manifest.update(extra)
        atomic_write_json(self.out_dir / MANIFEST, manifest)
        (self.out_dir / RUN_MARKER).unlink(missing_ok=True)
        return manifest


def write_shards(
    out_dir: Path,
    rows: Iterable[dict[str, Any]],
    schema: pa.Schema,
    config: dict[str, Any],
    *,
    shard_size: int = 10_000,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``rows`` to a fresh shard folder in chunks of ``shard_size``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    writer = ShardWriter(out_dir, schema, config)
    buf: list[dict[str, Any]] = []
    wrote_any = False
    for row in rows:
        buf.append(row)
        if len(buf) == shard_size:
            writer.write(buf)
            wrote_any = True
            buf = []
    if buf or not wrote_any:
        writer.write(buf)  # an empty result is still one (empty) shard, so readers see the schema
    return writer.close(extra)


def read_manifest(out_dir: Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not out_dir.is_dir():
        raise ShardError(f"{out_dir}: output folder does not exist (run the stage that writes it)")
    if not path.exists():
        raise ShardError(
            f"{out_dir}: incomplete output, no {MANIFEST} (the writing stage did not finish; rerun it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: unreadable manifest: {e}") from e
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    return manifest


def verify(out_dir: Path) -> dict[str, Any]:
    """Check the manifest, every shard's presence, row count and sha256. Returns the manifest."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    for entry in manifest["shards"]:
        p = out_dir / entry["file"]
        if not p.exists():
            raise ShardError(f"{out_dir}: shard {entry['file']} listed in the manifest is missing")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise ShardError(
                f"{out_dir}: shard {entry['file']} is corrupted (sha256 {digest[:12]}… "
                f"!= manifest {entry['sha256'][:12]}…)"
            )
    return manifest


def read_table(out_dir: Path, *, check: bool = True) -> pa.Table:
    """All shards of a complete folder as one table, checksums verified first."""
    out_dir = Path(out_dir)
    manifest = verify(out_dir) if check else read_manifest(out_dir)
    tables = []
    for entry in manifest["shards"]:
        table = read_shard(out_dir / entry["file"])
        if table.num_rows != entry["rows"]:
            raise ShardError(
                f"{out_dir}: shard {entry['file']} has {table.num_rows} rows, manifest says {entry['rows']}"
            )
        tables.append(table)
    return pa.concat_tables(tables)


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    return read_table(out_dir).to_pylist()


def clear_dir(path: Path) -> None:
    if Path(path).exists():
        shutil.rmtree(path)
