"""A large image collection as a list of input units (shards), each read on its own.

Every process of a distributed cache lists the same units in the same order, takes units one at a time and reads
only those. A unit's fingerprint (paths, sizes, modification times; for the hub, the pinned revision and shard)
tells a rerun that it is unchanged without reading it. The forms of `data`:
- webdataset tar shards (a brace pattern, a glob or a list): one unit per tar, read with the `webdataset` package;
- parquet files (a file, a glob, or a folder in the Hugging Face layout): one unit per file, read row group by row
  group with pyarrow;
- a `save_to_disk` folder: one unit per arrow file of the split;
- a Hugging Face hub dataset name: one unit per shard of the streamed split, at the revision listed;
- a folder of image files: fixed slices of `shard_size` files of the sorted listing.
A sample is the image file's bytes, undecoded (loader workers decode them); problems with one sample, and damaged
shards, are appended to `skipped` and never end a read.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import fsspec
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand
from webdataset import tariterators

from .files import describe_error, printable
from .images import IMAGE_EXTENSIONS, require_regular_file

KINDS_BY_SUFFIX = {".tar": "tar", ".parquet": "parquet", ".arrow": "arrow"}
SPLIT_WORD = re.compile(r"(train|validation|valid|val|test|dev|eval)(?=$|[-._ 0-9])")  # as the hub names files
ROWS_PER_BATCH = 64  # parquet rows converted to Python at a time (pyarrow holds one row group)
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # datasets' save_to_disk


def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return files


@dataclass(frozen=True)
class Unit:
    name: str  # stable, file-name safe and unique in its list
    kind: str  # "tar" | "parquet" | "arrow" | "folder" | "hub"
    fingerprint: str  # JSON (sorted keys) of what identifies the content without reading it
    files: tuple[str, ...] = ()  # tar/parquet/arrow: the file; folder: the slice's images, relative to `root`
    root: str = ""  # folder: the image folder
    dataset: str = ""  # hub: the dataset's name, `revision`, `split` and shard `shard` of `shards`
    revision: str = ""
    split: str = ""
    shard: int = 0
    shards: int = 0


@dataclass
class Sample:
    key: str  # f"{unit.name}/{member}": unique in the whole dataset and the same on every run
    data: bytes  # the image file's bytes, undecoded


def list_units(data: str | os.PathLike | list[str], shard_size: int = 1024, image_column: str = "image",
               split: str = "train", streaming: bool = False) -> list[Unit]:
    """The units of `data`, in the same order on every call; only stats files (never opens tars or parquet data).
    `image_column` and `streaming` are read_unit's and build_dataset's business: a hub dataset is always streamed,
    one unit per shard."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    data = os.fspath(data) if isinstance(data, os.PathLike) else data
    if not isinstance(data, str):
        return _file_units([path for pattern in data for path in _expand(pattern)], what=", ".join(data) or "[]")
    if not data:
        raise ValueError("no data named (an empty string)")
    path = Path(data)
    if path.is_dir():
        return _folder_units(path, shard_size, split)
    if path.exists() or re.search(r"[*?[{]", data) or not _could_be_hub_name(data):
        return _file_units(_expand(data), what=data)
    return _hub_units(data, split)


def read_unit(unit: Unit, skipped: list, image_column: str = "image") -> Iterator[Sample]:
    """The unit's samples in a fixed order. Each sample without an image, each unreadable file and a damaged shard
    is appended to `skipped` as dict(key=..., reason=...); reading goes on with the next sample."""
    if unit.kind == "tar":
        return _tar_samples(unit, skipped)
    if unit.kind in ("parquet", "arrow"):
        return _table_samples(unit, skipped, image_column)
    if unit.kind == "folder":
        return _folder_samples(unit, skipped)
    if unit.kind == "hub":
        return _hub_samples(unit, skipped, image_column)
    raise ValueError(f"unit {unit.name} has an unknown kind {unit.kind!r}")


# Listing


def _expand(pattern: str) -> list[Path]:
    """A path, a brace pattern (shards/{00000..00003}.tar) or a glob: the files, in the pattern's order (a glob's
    matches sorted). Names that match nothing are one error naming them."""
    if os.path.exists(pattern):
        return [Path(pattern)]
    names = list(braceexpand(pattern))
    found, missing = [], []
    for name in names:
        if re.search(r"[*?[]", name):
            matches = sorted(glob.glob(name, recursive=True))
        else:
            matches = [name] if os.path.exists(name) else []
        found += [Path(m) for m in matches]
        if not matches:
            missing.append(name)
    if missing:
        shown = ", ".join(printable(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        if len(names) == 1:
            raise FileNotFoundError(f"data not found: nothing matches {printable(pattern)}")
        raise FileNotFoundError(f"data not found: {len(missing)} of the {len(names)} files that "
                                f"{printable(pattern)} names are missing: {shown}")
    return found


def _file_units(paths: list[Path], what: str) -> list[Unit]:
    """One unit per tar, parquet or arrow file (all of one kind), each named once."""
    paths = list({os.path.abspath(p): p for p in paths}.values())  # a file named twice is read once
    if not paths:
        raise FileNotFoundError(f"data not found: {printable(what)} names no files")
    kinds = {_kind_of(p) for p in paths}
    if len(kinds) > 1:
        raise ValueError(f"{printable(what)} mixes {' and '.join(sorted(kinds))} files; name one kind at a time")
    kind = kinds.pop()
    return [Unit(name, kind, _file_fingerprint(p), files=(str(p),)) for name, p in zip(_unique_names(paths), paths)]


def _kind_of(path: Path) -> str:
    if path.is_dir():
        raise ValueError(f"{printable(path)} is a folder; name it on its own, not in a list or pattern")
    kind = KINDS_BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{printable(path)} is not a .tar, .parquet or .arrow file")
    return kind


def _unique_names(paths: list[Path]) -> list[str]:
    """File names, or, where two share one (a/00000.tar, b/00000.tar), paths below their common folder."""
    names = [printable(p.name) for p in paths]
    if len(set(names)) < len(names):
        common = os.path.commonpath([os.path.abspath(p) for p in paths])
        names = [printable(os.path.relpath(os.path.abspath(p), common)).replace("/", "__") for p in paths]
    if len(set(names)) < len(names):
        raise ValueError(f"two input files would share the unit name {_first_repeat(names)}; rename one")
    return names


def _first_repeat(names: list[str]) -> str:
    return next(n for i, n in enumerate(names) if n in names[:i])


def _file_fingerprint(path: Path) -> str:
    st = os.stat(path)
    return _json(dict(path=printable(os.path.abspath(path)), size=st.st_size, mtime_ns=st.st_mtime_ns))


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def _folder_units(path: Path, shard_size: int, split: str) -> list[Unit]:
    if any((path / m).exists() for m in SAVED_DATASET_MARKERS):
        return _file_units(_saved_dataset_files(path, split), what=printable(path))
    parquet = sorted(path.glob("*.parquet")) or sorted((path / "data").rglob("*.parquet"))
    if parquet:
        return _file_units(_of_split(parquet, path, split), what=printable(path))
    return _image_slices(path, shard_size)


def _saved_dataset_files(path: Path, split: str) -> list[Path]:
    """The arrow files of a save_to_disk folder (a DatasetDict: of `split`), in the dataset's order."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise ValueError(f"{printable(path)} has no split '{split}'; it has {', '.join(splits)}")
        path = path / split
    state = path / "state.json"
    if state.exists():
        return [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    return sorted(path.glob("*.arrow"))


def _of_split(files: list[Path], root: Path, split: str) -> list[Path]:
    """The files of `split` where the file or folder names carry splits, as the hub lays them out
    (data/train-00000-of-00002.parquet, train/0000.parquet); otherwise all of them."""
    splits = [_split_of(p.relative_to(root)) for p in files]
    if not any(splits):
        return files
    chosen = [p for p, s in zip(files, splits) if s == split]
    if not chosen:
        named = sorted({s for s in splits if s})
        raise ValueError(f"{printable(root)} has no parquet files of split '{split}'; it has {', '.join(named)}")
    return chosen


def _split_of(relative: Path) -> str | None:
    for part in relative.parts:
        match = SPLIT_WORD.match(part.lower())
        if match:
            return match.group(1)
    return None


def _image_slices(root: Path, shard_size: int) -> list[Unit]:
    """Slices of `shard_size` files of the sorted listing: a file added or removed moves later slices, a file
    changed in place changes only its own slice's fingerprint."""
    relative = sorted(p.relative_to(root).as_posix() for p in list_images(root))
    units = []
    for start in range(0, len(relative), shard_size):
        members = tuple(relative[start:start + shard_size])
        stats = [os.stat(root / m) for m in members]
        files = [[printable(m), st.st_size, st.st_mtime_ns] for m, st in zip(members, stats)]
        fingerprint = _json(dict(root=printable(os.path.abspath(root)), files=files))
        units.append(Unit(f"folder-{start // shard_size:06d}", "folder", fingerprint, files=members,
                          root=os.path.abspath(root)))
    return units


def _could_be_hub_name(data: str) -> bool:
    """A hub name is "name" or "owner/name"; a path that does not exist (./photos, x.tar) is reported missing."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", data) is not None and not data.startswith(".") \
        and Path(data).suffix.lower() not in KINDS_BY_SUFFIX


def _hub_units(name: str, split: str) -> list[Unit]:
    """One unit per shard of the streamed split, at the revision of the listing: every process and every later
    read sees the same shards even if the dataset gets new commits meanwhile."""
    try:
        revision = huggingface_hub.HfApi().dataset_info(name).sha
        shards = _hub_dataset(name, split, revision).n_shards
    except Exception as e:  # offline, no such dataset, gated: all the same to the user
        raise FileNotFoundError(f"data not found: '{name}' is not a local path, and the Hugging Face hub dataset "
                                f"could not be opened ({describe_error(e)})") from None
    safe_split = re.sub(r"[^\w.-]", "_", split)
    return [Unit(f"hub-{safe_split}-{i:05d}", "hub",
                 _json(dict(dataset=name, revision=revision, split=split, shard=i, shards=shards)),
                 dataset=name, revision=revision, split=split, shard=i, shards=shards) for i in range(shards)]


def _hub_dataset(name: str, split: str, revision: str) -> datasets.IterableDataset:
    return datasets.load_dataset(name, split=split, streaming=True, revision=revision)


# Reading


def _tar_samples(unit: Unit, skipped: list) -> Iterator[Sample]:
    """webdataset's tar reader groups members into samples by key; a read error ends the shard where it happened,
    after the samples before it. tarfile ends a shard silently at a header it cannot read (a cut at or inside a
    header, a garbled header), so a shard that stopped short of its end-of-archive blocks is reported too."""
    path = unit.files[0]
    size = os.stat(path).st_size
    if size == 0:
        skipped.append(dict(key=unit.name, reason="empty shard"))
        return
    errors = []

    def stop(error: Exception) -> bool:  # webdataset asks whether to go on after a reading error: never
        errors.append(error)
        return False

    def duplicate(error: Exception) -> bool:  # a member name repeated within a sample: that member is dropped
        skipped.append(dict(key=unit.name, reason=f"member skipped: {_reader_message(error)}"))
        return True

    count, seen, held = 0, set(), None
    with open(path, "rb") as f:
        members = tariterators.tar_file_expander([dict(url=printable(path), stream=f)], handler=stop)
        for sample in tariterators.group_by_keys(members, handler=duplicate):
            if held is not None:  # held back one sample: the last one may be the damaged one
                count += 1
                yield from _tar_sample(unit, held, seen, skipped)
            held = sample
        damaged = bool(errors) or not _ends_cleanly(f, size)
    if held is not None and not (damaged and _image_member(held) is None):  # its image was read whole
        count += 1
        yield from _tar_sample(unit, held, seen, skipped)
    if damaged:
        detail = _reader_message(errors[0]) if errors else "it stops before its end-of-archive blocks"
        skipped.append(dict(key=unit.name, reason=f"truncated tar after {count} samples: {detail}"))
    elif held is None:
        skipped.append(dict(key=unit.name, reason="empty shard"))


def _tar_sample(unit: Unit, sample: dict, seen: set, skipped: list) -> Iterator[Sample]:
    key = f"{unit.name}/{printable(sample['__key__'])}"
    member = _image_member(sample)
    if key in seen:  # webdataset groups consecutive members only: a.jpg, b.jpg, a.json makes two samples "a"
        skipped.append(dict(key=key, reason="key repeated in the shard (its members are not next to each other)"))
    elif member is None:
        members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
        skipped.append(dict(key=key, reason=f"no image file in the sample (members: {members})"))
    else:
        yield Sample(key, sample[member])
    seen.add(key)


def _image_member(sample: dict) -> str | None:
    """The first member whose last extension is an image's ("jpg", "seg.png"; webdataset lower-cases them)."""
    return next((k for k in sample if not k.startswith("__") and f".{k.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS),
                None)


def _ends_cleanly(f, size: int) -> bool:
    """Whether nothing but zeros follows what the tar reader read, down to the file's last two blocks: a whole
    archive ends in at least two zero blocks, a cut one in a member's header or data."""
    f.seek(min(f.tell(), max(0, size - 1024)))
    while chunk := f.read(1 << 16):
        if chunk.strip(b"\0"):
            return False
    return True


def _reader_message(error: Exception) -> str:
    """webdataset appends " @ <stream>" and the stream itself to an error's arguments; the caller names the file."""
    text = str(error.args[0]).split(" @ <")[0] if error.args else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _table_samples(unit: Unit, skipped: list, image_column: str) -> Iterator[Sample]:
    """Parquet row group by row group, arrow record batch by batch: never the whole file in memory. Keys are row
    numbers (the paths stored beside images are often empty or repeated)."""
    row = 0
    with open(unit.files[0], "rb") as f:
        if unit.kind == "parquet":
            table = pq.ParquetFile(f)
            _require_column(table.schema_arrow, image_column, unit)
            batches = table.iter_batches(batch_size=ROWS_PER_BATCH, columns=[image_column])
        else:  # save_to_disk writes arrow streams
            batches = pa.ipc.open_stream(f)
            _require_column(batches.schema, image_column, unit)
        for batch in batches:
            for cell in batch.column(image_column).to_pylist():
                yield from _cell_sample(f"{unit.name}/{row}", cell, skipped)
                row += 1


def _require_column(schema: pa.Schema, image_column: str, unit: Unit) -> None:
    if image_column not in schema.names:
        raise ValueError(f"image column '{image_column}' not in {printable(unit.files[0])}; columns: "
                         f"{', '.join(schema.names)}")


def _cell_sample(key: str, cell, skipped: list) -> Iterator[Sample]:
    """An image cell: the Image feature's {bytes, path} or plain bytes. A cell with only a path is read from it,
    as datasets' own decoding does: Dataset.to_parquet stores local files by path, and hub image folders stream
    so. fsspec reads local paths and URLs (hf://) alike; such files are outside the unit's fingerprint."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    path = cell.get("path") if isinstance(cell, dict) else None
    if data is None and path:
        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except Exception as e:  # a remote file system's errors are not all OSError
            skipped.append(dict(key=key, reason=f"the image is stored only as a path, and {path} could not be "
                                                 f"read: {describe_error(e)}"))
            return
    if isinstance(data, (bytes, bytearray)):
        yield Sample(key, bytes(data))
    else:
        skipped.append(dict(key=key, reason="no image (empty cell)" if data is None else
                            f"the image cell holds {type(data).__name__}, not bytes"))


def _folder_samples(unit: Unit, skipped: list) -> Iterator[Sample]:
    for member in unit.files:
        path = os.path.join(unit.root, member)
        try:
            require_regular_file(path)  # a FIFO put in a file's place would block the read for ever
            with open(path, "rb") as f:
                data = f.read()
        except (OSError, ValueError) as e:
            skipped.append(dict(key=f"{unit.name}/{printable(member)}", reason=describe_error(e)))
            continue
        yield Sample(f"{unit.name}/{printable(member)}", data)


def _hub_samples(unit: Unit, skipped: list, image_column: str) -> Iterator[Sample]:
    stream = _hub_dataset(unit.dataset, unit.split, unit.revision)
    if stream.features is not None and image_column not in stream.features:
        raise ValueError(f"image column '{image_column}' not in {unit.dataset}; columns: "
                         f"{', '.join(stream.features)}")
    if stream.features is not None and isinstance(stream.features[image_column], datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    for row, example in enumerate(stream.shard(num_shards=unit.shards, index=unit.shard)):
        yield from _cell_sample(f"{unit.name}/{row}", example.get(image_column), skipped)
