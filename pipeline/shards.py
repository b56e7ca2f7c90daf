"""Arrow shard folders: the on-disk contract between stages.

A stage output folder holds ``shard-00000.arrow``, ``shard-00001.arrow``, ... (Arrow IPC
*stream* format, which is what ``datasets.Dataset.from_file`` memory-maps) and a
``manifest.json`` written last. A folder without a manifest is incomplete and is refused.

Every file is written under a temporary name and renamed into place, so a crash never
leaves a half-written shard under a final name. A whole output (a shard folder, a set of
report files) is built the same way beside the old one by ``replacing`` and swapped in at
the end: a failure at any point leaves the previous output whole and no temporary behind.

Resumable writers (``generate``) keep the complete shards of an interrupted run when the
run's config hash is unchanged: the hash is recorded in ``_run.json`` when the run starts,
before any shard, and each shard's row count and sha256 are added to it as soon as the
shard is complete. On resume a shard is kept only if its bytes still match that record; a
changed, truncated or unrecorded shard is deleted (and logged) so that its rows are
generated again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import ConfigError, InputError, kind_of, shown

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RUN_MARKER = "_run.json"
STATS = "stats.json"  # the statistics file a stage writes beside its shard folders
_SHARD_RE = re.compile(r"^shard-(\d{5})\.arrow$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# A name that becomes one folder or file inside a stage's output: one path component that
# cannot climb out ("..") or stay put ("."), hide, or take the name of a file the stage writes.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_RESERVED_NAMES = (MANIFEST, RUN_MARKER, STATS)

log = logging.getLogger("mind.shards")

# The row schemas of the folders one stage hands to the next, defined once each: ``prepare``
# writes QUESTION_SCHEMA, ``generate`` RATIONALE_SCHEMA, and ``filter`` FILTERED_SCHEMA (the
# rationale columns, then the judgement and the training text's columns, which ``distill`` reads).
QUESTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_type", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("source", pa.string()),
    ]
)

RATIONALE_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("teacher", pa.string()),
        ("perspective", pa.string()),
        ("sample_index", pa.int32()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("num_tokens", pa.int32()),
        ("seed", pa.int64()),
    ]
)

FILTERED_SCHEMA = pa.schema(
    list(RATIONALE_SCHEMA)
    + [
        pa.field("pred_answer", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("question_pass_rate", pa.float64()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("answer_type", pa.string()),
        pa.field("answer_offset", pa.int32()),
        pa.field("train_tokens", pa.int32()),
        pa.field("rewrite", pa.string()),
    ]
)


class ShardError(InputError):
    """An output folder is missing, incomplete or corrupted."""


def check_name(name: str, what: str) -> None:
    """Raise ConfigError unless ``name`` is a plain name for a folder inside an output root."""
    if not _NAME_RE.match(name) or name in _RESERVED_NAMES:
        raise ConfigError(
            f"{what} {shown(name)} must be a plain name: letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit, at most 100 characters, and none of {', '.join(_RESERVED_NAMES)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clean_after_kill(path: Path) -> None:
    """Remove what a run killed inside ``replacing`` left beside ``path``: a half-built new
    version, or the old version set aside (put back if the kill came before the new one
    took its place)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-\d+")
    for stale in sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name)):
        if stale.name.startswith(f".{path.name}.old-") and not path.exists():
            os.replace(stale, path)
        else:
            _remove(stale)


def _check_replaceable(folder: Path) -> None:
    foreign = sorted(p.name for p in folder.iterdir()
                     if not (_SHARD_RE.match(p.name) or p.name in _RESERVED_NAMES or ".tmp-" in p.name))
    if foreign:
        raise ShardError(f"{folder}: holds {shown(foreign[0])}, which is not part of a shard folder "
                         f"({len(foreign)} such entries); not replacing it (choose a new or empty folder)")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Build the new version of ``path`` (a file or a folder) at the path this yields, beside
    it; when the block ends, the new version takes the place of the old. When the block
    raises, the new version is removed and ``path`` is left exactly as it was.

    A folder is replaced only if it is a shard folder: a mistyped output path must not delete
    a folder of other files. A file is swapped in one atomic rename. A folder takes two (the old one aside, the new one
    in; the old one is then deleted): a failure of the second puts the old one back."""
    path = Path(path)
    if path.name in ("", ".", ".."):  # "data/.." would set the parent of the output aside
        raise ConfigError(f"{path}: an output must be a named file or folder, not '.' or '..'")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_after_kill(path)
    if path.is_dir():
        _check_replaceable(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def replacing_all(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """``replacing`` for several outputs that must agree (a report's text, metrics and plot):
    all are written under temporary names first and renamed only once every one is complete."""
    with ExitStack() as stack:
        yield [stack.enter_context(replacing(p)) for p in paths]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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


def mismatched_file(folder: Path, digests: dict[str, str]) -> tuple[str, str | None] | None:
    """The first file of ``digests`` (path inside ``folder`` -> recorded sha256), in its order, that
    is not a file in ``folder`` (``(name, None)``) or whose sha256 differs (``(name, its sha256)``);
    None when every one matches. Shard manifests and distill's checkpoints are checked with it."""
    for name, recorded in digests.items():
        path = folder / name
        if not path.is_file():
            return name, None
        digest = sha256_file(path)
        if digest != recorded:
            return name, digest
    return None


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
    with replacing(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


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
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``rows`` as a fresh shard folder in chunks of ``shard_size``, with ``stats``
    (if given) as its stats.json; it replaces ``out_dir`` only once complete (``replacing``)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    with replacing(out_dir) as tmp:
        writer = ShardWriter(tmp, schema, config)
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
        manifest = writer.close()
        if stats is not None:
            atomic_write_json(tmp / STATS, stats)
    return manifest


def _manifest_error(path: Path, what: str) -> ShardError:
    return ShardError(f"{path}: {what} (the manifest was changed by hand or by another tool; rerun the stage)")


def _check_manifest(path: Path, manifest: Any) -> None:
    """A manifest has the shape ``ShardWriter.close`` writes: every shard entry names a shard
    file of this folder (never a path elsewhere), its rows and sha256, and the rows add up."""
    if not isinstance(manifest, dict):
        raise _manifest_error(path, f"expected a JSON object, got {kind_of(manifest)}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {shown(manifest.get('schema_version'))}, expected {SCHEMA_VERSION}")
    lacking = [k for k in ("num_rows", "shards", "columns") if k not in manifest]
    if lacking:
        raise _manifest_error(path, f"lacks {', '.join(lacking)}")
    if not isinstance(manifest["shards"], list):
        raise _manifest_error(path, f"shards: expected a list, got {kind_of(manifest['shards'])}")
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise _manifest_error(path, f"shards[{i}]: expected a mapping, got {kind_of(entry)}")
        file = entry.get("file")
        if not isinstance(file, str) or not _SHARD_RE.match(file):
            raise _manifest_error(path, f"shards[{i}].file: {shown(file)} is not a shard file name (shard-NNNNN.arrow)")
        rows = entry.get("rows")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise _manifest_error(path, f"shard {file}: rows {shown(rows)} is not a row count")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise _manifest_error(path, f"shard {file}: sha256 {shown(digest)} is not a sha256 digest")
    files = [e["file"] for e in manifest["shards"]]
    if len(set(files)) != len(files):
        raise _manifest_error(path, "lists a shard twice")
    total = sum(e["rows"] for e in manifest["shards"])
    if manifest["num_rows"] != total:
        raise _manifest_error(path, f"num_rows {shown(manifest['num_rows'])}, but its shards hold {total}")
    columns = manifest["columns"]
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise _manifest_error(path, f"columns: expected a list of names, got {shown(columns)}")


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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ShardError(f"{path}: unreadable manifest: {shown(str(e))}") from None
    _check_manifest(path, manifest)
    return manifest


def verify(out_dir: Path) -> dict[str, Any]:
    """Check the manifest, that it lists exactly the shard files on disk, and every shard's
    sha256. Returns the manifest."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    listed = {e["file"] for e in manifest["shards"]}
    unlisted = [p.name for p in shard_files(out_dir) if p.name not in listed]
    if unlisted:
        raise ShardError(f"{out_dir}: shard {unlisted[0]} is not listed in the manifest "
                         f"({len(unlisted)} unlisted; a manifest lists every shard of its folder)")
    recorded = {e["file"]: e["sha256"] for e in manifest["shards"]}
    bad = mismatched_file(out_dir, recorded)
    if bad is not None:
        name, digest = bad
        if digest is None:
            raise ShardError(f"{out_dir}: shard {name} listed in the manifest is missing")
        raise ShardError(
            f"{out_dir}: shard {name} is corrupted (sha256 {digest[:12]}… != manifest {recorded[name][:12]}…)"
        )
    return manifest


def read_table(out_dir: Path) -> pa.Table:
    """All shards of a complete folder as one table, the manifest and checksums verified first."""
    out_dir = Path(out_dir)
    manifest = verify(out_dir)
    tables = []
    for entry in manifest["shards"]:
        table = read_shard(out_dir / entry["file"])
        if table.num_rows != entry["rows"]:
            raise ShardError(
                f"{out_dir}: shard {entry['file']} has {table.num_rows} rows, manifest says {entry['rows']}"
            )
        if table.schema.names != manifest["columns"]:
            raise ShardError(f"{out_dir}: shard {entry['file']} has columns {shown(table.schema.names)}, "
                             f"the manifest lists {shown(manifest['columns'])}")
        if tables and not table.schema.equals(tables[0].schema):
            raise ShardError(f"{out_dir}: shard {entry['file']} has schema {shown(str(table.schema))}, "
                             f"shard {manifest['shards'][0]['file']} {shown(str(tables[0].schema))}")
        tables.append(table)
    return pa.concat_tables(tables)


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    return read_table(out_dir).to_pylist()


def clear_dir(path: Path) -> None:
    if Path(path).exists():
        shutil.rmtree(path)
