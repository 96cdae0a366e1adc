"""Recorded activations on disk: safetensors shards listed in a JSON manifest.

A record folder contains ``manifest.json`` and ``shard-NNNNNN.safetensors`` files. A shard is
written to a temporary file and renamed into place. The manifest, also replaced by a rename, is
updated only after its shards are in place. So every shard the manifest lists is complete, and
a file it does not list (left by a killed process) is never read.

A shard contains, for every recorded module, ``source/<module>/input``,
``source/<module>/output`` (sites) or ``target/<module>/input``, ``target/<module>/output``
(anchors), of shape ``(rows, d)``, and ``text_ids``, the corpus index of each row's passage.
Row ``k`` of every tensor in a shard belongs to the same text prefix.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loracast.serialization import FORMAT_VERSION, FormatError, provenance

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KIND = "recording"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# safetensors dtype names -> numpy dtypes for memory-mapped reads. numpy has no bfloat16, so
# bfloat16 rows are read as uint16 bit patterns and reinterpreted by torch.
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}


def shard_file(index: int) -> str:
    """Return the file name of shard ``index``."""
    return f"shard-{index:06d}.safetensors"


def tensor_key(side: str, module: str, kind: str) -> str:
    """Return the key of a module's rows in a shard: ``source/<module>/input`` and so on."""
    return f"{side}/{module}/{kind}"


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    temporary = _temporary_path(path)
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> int:
    """Write tensors to ``path`` through a temporary file and a rename; return the file size."""
    temporary = _temporary_path(path)
    try:
        contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
        save_file(contiguous, str(temporary), metadata=metadata)
        # safetensors creates the file with mode 0600; give it the mode the umask allows.
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)
        _fsync(temporary)
        size = temporary.stat().st_size
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return size


def remove_temporary_files(folder: Path) -> int:
    """Delete files that a killed writer left half written; return how many were deleted."""
    removed = 0
    for path in folder.glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        logger.info("removed %d unfinished files from %s", removed, folder)
    return removed


class BackgroundWriter:
    """Write shards on a background thread, so disk I/O overlaps the next shard's computation.

    At most one write is pending, because ``submit`` first waits for the previous one, so memory
    contains at most the shard being written and the one being recorded. Leaving the ``with``
    block waits for the pending write.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loracast-shards")
        self._pending: Future | None = None

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self._executor.shutdown(wait=True)

    def submit(self, path: Path, tensors: dict[str, torch.Tensor], record: dict) -> list[dict]:
        """Start writing ``tensors`` to ``path``; return the records of finished writes.

        A finished write's record is ``record`` plus the file name and its size in bytes.
        """
        finished = self.wait()
        self._pending = self._executor.submit(self._write, path, tensors, record)
        return finished

    def wait(self) -> list[dict]:
        """Wait for the pending write; return its record (none when nothing is pending).

        Raises:
            OSError: the write failed.
        """
        if self._pending is None:
            return []
        record = self._pending.result()
        self._pending = None
        return [record]

    @staticmethod
    def _write(path: Path, tensors: dict[str, torch.Tensor], record: dict) -> dict:
        size = write_safetensors_atomic(path, tensors, {"shard": str(record["index"])})
        return {**record, "file": path.name, "bytes": size}


@dataclass
class Manifest:
    """A recording's manifest: what produced it, its finished shards, and totals once complete.

    Attributes:
        identity: everything that fixes the recorded rows: both models' fingerprints, the
            corpus, the recorded modules of both models, and the recording settings. A run
            resumes only into a folder with an equal identity.
        recording_id: a random id, new for every recording started from scratch.
        shards: finished shards by index: file name, rows, passages and token counts.
        complete: True once every shard is recorded.
        stats: totals of the complete recording (texts, positions, source tokens, coverage).
        provenance: versions and command line of the run that started the recording.
    """

    identity: dict
    recording_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    shards: dict[int, dict] = field(default_factory=dict)
    complete: bool = False
    stats: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=provenance)

    def to_json(self) -> dict:
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "recording_id": self.recording_id,
            "complete": self.complete,
            "identity": self.identity,
            "shards": [{"index": index, **self.shards[index]} for index in sorted(self.shards)],
            "stats": self.stats,
            "provenance": self.provenance,
        }

    def save(self, folder: Path) -> None:
        """Replace ``folder/manifest.json`` in one rename."""
        write_json_atomic(folder / MANIFEST, self.to_json())

    @classmethod
    def load(cls, folder: Path) -> Manifest | None:
        """Read ``folder/manifest.json``; None when the folder has none.

        Raises:
            FormatError: the manifest is malformed, of another kind or of a newer format.
        """
        path = folder / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FormatError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise FormatError(f"{path} is not a loracast recording manifest; pass another folder")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise FormatError(
                f"{path}: format_version {data.get('format_version')} is newer than this "
                f"loracast supports ({FORMAT_VERSION}); upgrade loracast"
            )
        shards = {}
        for record in data["shards"]:
            record = dict(record)
            shards[int(record.pop("index"))] = record
        return cls(
            identity=data["identity"],
            recording_id=data["recording_id"],
            shards=shards,
            complete=bool(data["complete"]),
            stats=data.get("stats", {}),
            provenance=data.get("provenance", {}),
        )


def identity_differences(recorded: object, requested: object, path: str = "") -> list[str]:
    """List where two identities differ, as ``path: recorded X, this run Y`` lines."""
    if isinstance(recorded, dict) and isinstance(requested, dict):
        differences = []
        for key in sorted(set(recorded) | set(requested), key=str):
            differences += identity_differences(
                recorded.get(key), requested.get(key), f"{path}.{key}" if path else str(key)
            )
        return differences
    if recorded != requested:
        return [f"{path}: recorded {recorded!r}, this run {requested!r}"]
    return []


def check_identity(manifest: Manifest, identity: dict, folder: Path) -> None:
    """Raise ValueError, listing every difference, when a run does not match the recording."""
    # A JSON round trip turns tuples into lists, as in the saved manifest.
    differences = identity_differences(manifest.identity, json.loads(json.dumps(identity)))
    if differences:
        listed = "\n  ".join(differences)
        raise ValueError(
            f"record folder {folder} was recorded by a different run, so it cannot be resumed:"
            f"\n  {listed}\nrerun with the recorded settings, or pass a new --record-dir"
        )


@dataclass(frozen=True)
class _TensorLocation:
    offset: int  # bytes from the start of the file
    dtype: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, _TensorLocation]:
    """Parse a safetensors header: an 8-byte little-endian length, then JSON."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    locations = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        begin = entry["data_offsets"][0]
        locations[key] = _TensorLocation(8 + length + begin, entry["dtype"], tuple(entry["shape"]))
    return locations


class ShardReader:
    """Read a complete recording shard by shard, or any rows through memory maps.

    Only shards listed in the manifest are opened. Memory maps let the operating system page
    rows in and out, so random access to a recording larger than memory stays possible.

    Raises:
        FileNotFoundError: the folder has no manifest.
        ValueError: the recording is not complete, or a listed shard has the wrong size.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        manifest = Manifest.load(self.folder)
        if manifest is None:
            raise FileNotFoundError(
                f"{self.folder / MANIFEST} not found; record the corpus into {self.folder} first"
            )
        if not manifest.complete:
            raise ValueError(
                f"the recording in {self.folder} is not complete ({len(manifest.shards)} shards "
                "so far); rerun the recording command to finish it"
            )
        self.manifest = manifest
        self.indices = [i for i in sorted(manifest.shards) if manifest.shards[i]["rows"] > 0]
        for index in self.indices:
            record = manifest.shards[index]
            path = self.folder / record["file"]
            if not path.is_file() or path.stat().st_size != record["bytes"]:
                raise ValueError(
                    f"shard {path} is missing or has another size than the manifest lists "
                    f"({record['bytes']} bytes); delete {self.folder} and record again"
                )
        self._headers: dict[int, dict[str, _TensorLocation]] = {}
        self._maps: dict[tuple[int, str], np.memmap] = {}

    def rows(self, index: int) -> int:
        """Return the number of rows in shard ``index``."""
        return int(self.manifest.shards[index]["rows"])

    def path(self, index: int) -> Path:
        return self.folder / self.manifest.shards[index]["file"]

    def load(self, index: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """Return the named tensors of shard ``index``, float tensors as float32."""
        # safe_open reads only the requested tensors, not the whole shard.
        with safe_open(str(self.path(index)), framework="pt") as handle:
            missing = [key for key in keys if key not in handle.keys()]
            if missing:
                raise ValueError(f"shard {self.path(index)} has no tensors {missing}")
            tensors = {key: handle.get_tensor(key) for key in keys}
        return {
            key: value.float() if value.is_floating_point() else value
            for key, value in tensors.items()
        }

    def text_ids(self, index: int) -> torch.Tensor:
        """Return the corpus index of the passage of every row of shard ``index``."""
        return self.load(index, ["text_ids"])["text_ids"]

    def take(self, index: int, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Return rows ``rows`` of tensor ``key`` in shard ``index`` as float32, read by mmap."""
        array = self._memmap(index, key)[rows.numpy()]
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self._headers[index][key].dtype == "BF16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.float()

    def _memmap(self, index: int, key: str) -> np.memmap:
        if (index, key) not in self._maps:
            if index not in self._headers:
                self._headers[index] = _read_header(self.path(index))
            location = self._headers[index].get(key)
            if location is None:
                raise ValueError(f"shard {self.path(index)} has no tensor {key!r}")
            self._maps[index, key] = np.memmap(
                self.path(index),
                dtype=_NUMPY_DTYPES[location.dtype],
                mode="r",
                offset=location.offset,
                shape=location.shape,
            )
        return self._maps[index, key]
