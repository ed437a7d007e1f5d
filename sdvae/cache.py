"""Latent caches for diffusion training: `sdvae cache-latents --vae X --data D --out CACHE`, on one process or on
many (torchrun / accelerate launch ranks, a Slurm array, several machines on one shared file system).

A diffusion trainer that runs the VAE encoder on every image every epoch spends much of its time there; this
encodes each image once. Each image is resized and cropped to an aspect-ratio bucket, and the encoder's posterior
(mean and std, unscaled) is kept, so that the trainer draws a fresh sample mean + std * eps every epoch.

The unit of work is one input shard (sdvae.inputs: a tar, a parquet or arrow file, a slice of a folder), and each
gives one output shard. Processes share the work through claims in the output folder (sdvae.claims):

    CACHE/README.md                    dataset card: `datasets.load_dataset(CACHE, streaming=True)` reads the shards
    CACHE/shards/<unit>.parquet        one row per readable image: key, sha256 of its bytes, bucket, sizes, crop
                                       boxes, mean and std (C, h, w) [mean_flipped, std_flipped]
    CACHE/done/<unit>.json             the unit's completion record: its input fingerprint, the cache key, the
                                       shard's sha256 and rows, and the unit's skipped files with the reason
    CACHE/claims/<unit>.json           a unit being encoded, and by whom
    CACHE/manifest.json                written when every unit is done: format, VAE fingerprint, factors, settings,
                                       every shard's rows and sha256 (sdvae.cache_reader reads through it)

A unit is done again only when its input's fingerprint (paths, sizes, mtimes: read without opening its images),
the encoder's weights or a setting changed: a rerun reads nothing of finished units and leaves their shards as
they are. Files are written atomically, so a killed run continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import socket
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from .claims import Claims
from .codec import VAECodec, load_vae, require_weights
from .config import SEEDS, at_least, check_ranges
from .data import seed_for
from .files import atomic_json, atomic_write, describe_error, prepare_output_folder, printable, refuse_foreign_output
from .images import open_image, pixels_to_tensor
from .inputs import list_units, read_unit
from .weights import dtype_name

log = logging.getLogger(__name__)

FORMAT = 2  # 1: safetensors shards under one index.json; 2: a parquet shard per input unit, done records, manifest
LATENT_DTYPES = {"fp32": np.float32, "fp16": np.float16}
DATASET_CARD = """---
configs:
- config_name: default
  data_files: shards/*.parquet
tags: [sdvae, latents]
---

# Latent cache

Written by `sdvae cache-latents`. One row per image: `key`, `sha256` (of the image file), `bucket` (W, H),
`original_size`, `resized_size`, `crop_box`, `crop_box_original`, and the VAE posterior's `mean` and `std` as
(C, h, w) nested lists, unscaled (`mean_flipped`, `std_flipped`: the mirrored crop's). `manifest.json` holds
the VAE's fingerprint and the factors a diffusion trainer needs: `(z - shift_factor) * scaling_factor`.
"""


# ---- buckets and crops -------------------------------------------------------------------------------------

def bucket_sizes(resolution: int, bucketing: bool = True) -> list[tuple[int, int]]:
    """(W, H) buckets of about resolution² pixels with aspects from 1:4 to 4:1, SDXL-style.

    Sides are multiples of 64, so latent sides are multiples of 8 (what diffusion UNets downsample by);
    below 256 px multiples of resolution/4 instead, where steps of 64 would leave only the square."""
    if resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    if not bucketing:
        return [(resolution, resolution)]
    step = max(8, min(64, resolution // 4 // 8 * 8))
    sizes = []
    for h in range(resolution // step * step, 0, -step):  # landscape (w >= h) sizes, then their transposes
        w = resolution * resolution // h // step * step
        if h <= w <= 4 * h:
            sizes += [(w, h), (h, w)] if w != h else [(w, h)]
    return sizes


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect is closest on a log scale (2:1 is as far from 1:1 as 1:2)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def plan_crop(size: tuple[int, int], bucket: tuple[int, int], random_crop: bool = False, seed: int = 0) -> dict:
    """Resize (W, H) to cover the bucket (shorter side fits), then crop it: the boxes are (left, top, right,
    bottom) in the resized image and, as floats, in the original image's pixels."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if random_crop:
        rng = torch.Generator().manual_seed(seed)
        left, top = (int(torch.randint(n + 1, (1,), generator=rng)) for n in (rw - bw, rh - bh))
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    box = (left, top, left + bw, top + bh)
    original = tuple(round(v * s, 3) for v, s in zip(box, (w / rw, h / rh, w / rw, h / rh)))
    return dict(original_size=(w, h), bucket=bucket, resized_size=(rw, rh), crop_box=box, crop_box_original=original)


# ---- hashes ----------------------------------------------------------------------------------------------

def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encoder_hash(model) -> str:
    """sha256 over what makes the latents: the encoder's and quant_conv's weights (sorted names, shapes, bytes),
    their GroupNorms' groups and eps and their activations, which no weight shows (the same weights with other
    norm groups give other latents). The decoder is left out: a decoder-only fine-tune (ft-EMA, ft-MSE) keeps a
    cache valid."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if not name.startswith(("encoder.", "quant_conv")):
            continue
        if isinstance(module, torch.nn.GroupNorm):
            digest.update(f"{name}:GroupNorm({module.num_groups}, eps={module.eps})".encode())
        elif next(module.children(), None) is None and next(module.parameters(), None) is None:  # SiLU, Mish...
            digest.update(f"{name}:{type(module).__name__}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- settings ----------------------------------------------------------------------------------------------

# every numeric setting's values (each also finite; None passes where the field allows it): see check_ranges
CACHE_RANGES = dict(resolution=at_least(8), batch_size=at_least(1), num_workers=at_least(0), shard_size=at_least(1),
                    seed=SEEDS, max_pixels=at_least(1), claim_timeout=at_least(1))


@dataclass
class CacheSettings:
    """`sdvae cache-latents`' settings; the fields are its flags (`--no-buckets` is no_buckets)."""
    resolution: int = 256  # buckets of about resolution^2 pixels
    crop: str = "center"  # center | random
    flip: bool = False  # also store the latents of the mirrored crops
    no_buckets: bool = False  # one square bucket, resolution x resolution
    batch_size: int = 8
    num_workers: int | None = None  # loader processes (default: min(4, CPUs))
    shard_size: int = 1024  # images per unit of a folder (tars and parquet files are a unit each)
    dtype: str = "fp32"  # encoder precision
    latent_dtype: str = "fp32"  # what the shards store: fp32 | fp16
    device: str | None = None
    backend: str | None = None  # load_vae's: None is $SDVAE_BACKEND, else auto
    seed: int = 0  # seeds the random crops
    max_pixels: int | None = None
    image_column: str = "image"  # parquet / datasets inputs
    split: str = "train"  # a Hugging Face dataset's
    claim_timeout: float = 600  # seconds after which a claim nobody touched is taken again (its worker died)
    overwrite: bool = False  # write into an --out that holds files sdvae did not write

    def __post_init__(self):
        check_ranges(self, CACHE_RANGES)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples 8x), got {self.resolution}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be center or random, got {self.crop!r}")
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent_dtype must be one of {', '.join(LATENT_DTYPES)}, got {self.latent_dtype!r}")
        dtype_name(self.dtype)

    def keyed(self) -> dict:
        """What the latents depend on, besides the encoder and the image: part of every unit's key."""
        return dict(resolution=self.resolution, crop=self.crop, flip=self.flip, buckets=not self.no_buckets,
                    dtype=dtype_name(self.dtype), latent_dtype=self.latent_dtype,
                    seed=self.seed if self.crop == "random" else None, format=FORMAT)


# ---- building ----------------------------------------------------------------------------------------------

def build_cache(vae, data, out, settings: CacheSettings | None = None, on_shard=None, progress: bool = True,
                only: list[str] | None = None, **flags) -> dict:
    """Encode the units of `data` that `out` does not hold yet, sharing them with every other process that works
    on `out`; returns this process's report. `vae` is a path or a loaded `VAECodec` (then `dtype` should name its
    precision: it is part of the key). `on_shard(record)` is called after each shard is written. `only`: the
    names of the units this call may take (an engine that hands units out, sdvae.cache_ray)."""
    s = dataclasses.replace(settings or CacheSettings(), **flags)
    out = Path(out)
    refuse_old_cache(out)
    units = list_units(data, s.shard_size, s.image_column, s.split)  # errors on missing / empty data come first
    overwrite = s.overwrite or any((out / part).is_dir() for part in ("done", "claims"))  # a cache's, being built
    refuse_foreign_output(out, overwrite, whole=False)  # before the VAE loads; the folder is made once it has
    start = time.time()
    codec = vae if isinstance(vae, VAECodec) else load_vae(vae, s.device or default_device(), s.dtype,
                                                           backend=s.backend)
    require_weights(codec, "cache-latents")
    prepare_output_folder(out, "cache-latents", overwrite)
    if not (out / "README.md").is_file():
        atomic_write(out / "README.md", DATASET_CARD)
    vae_hash = encoder_hash(codec.model)
    cache_key = hashlib.sha256(f"{vae_hash}|{json.dumps(s.keyed(), sort_keys=True)}".encode()).hexdigest()
    for folder in ("shards", "done"):
        (out / folder).mkdir(exist_ok=True)
    report = dict(units=len(units), encoded_units=0, reused_units=0, busy_units=0, encoded=0, skipped=0,
                  skipped_files=[], damaged_shards=[], host=socket.gethostname(), pid=os.getpid())
    mine = units if only is None else [u for u in units if u.name in set(only)]
    todo = [u for u in in_my_order(mine) if not is_done(out, u, cache_key, report)]
    workers = default_workers() if s.num_workers is None else s.num_workers
    bar = tqdm(total=len(todo), desc="cache-latents", unit="shard", disable=not progress)
    loop_start = time.time()
    with Claims(out / "claims", s.claim_timeout) as claims, ThreadPoolExecutor(1) as writer, bar:
        writing = None  # the writer thread writes one unit while the next is encoded
        for unit in todo:
            if not claims.claim(unit.name):
                report["busy_units"] += 1
                bar.update(1)  # another process's: off this process's list too
                continue
            if is_done(out, unit, cache_key):  # finished by another process after our first look
                claims.release(unit.name)
                bar.update(1)
                continue
            started = time.time()
            rows, skipped, seconds = encode_unit(codec, unit, s, workers)
            report["encoded"] += len(rows)
            report["encoded_units"] += 1
            if writing is not None:
                writing.result()  # a failed write stops the run here, before another unit is written
            writing = writer.submit(write_unit, out, unit, rows, skipped, cache_key, s, claims, on_shard, started)
            bar.update(1)
            bar.set_postfix(img_s=f"{len(rows) / max(seconds, 1e-9):.3g}")
            report["skipped"] += len(skipped)
            report["skipped_files"] += skipped[:1000]
        if writing is not None:
            writing.result()
    add_rates(report, start, loop_start)
    report["manifest"] = write_manifest_when_complete(out, units, cache_key, vae_hash, codec, s)
    return report


def add_rates(report: dict, start: float, loop_start: float) -> None:
    report["seconds"] = round(time.time() - start, 2)  # with the VAE load
    encoding = time.time() - loop_start
    report["images_per_sec"] = round(report["encoded"] / encoding, 3) if report["encoded"] else None


def default_device() -> str:
    """cuda:LOCAL_RANK under torchrun / accelerate launch on GPUs: one GPU per process."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def default_workers() -> int:
    """min(4, the CPUs of this process's share of the host): torchrun ranks on one machine split its cores."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(4, max(1, (os.cpu_count() or 1) // processes_here))


def in_my_order(units: list) -> list:
    """Every process walks the same units from another starting point, so that they rarely meet at a claim:
    ranks spread evenly, independent invocations by their pid."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    start = len(units) * rank // world if world > 1 else random.Random(os.getpid()).randrange(max(1, len(units)))
    return units[start:] + units[:start]


def refuse_old_cache(out: Path) -> None:
    if (out / "index.json").is_file() and not (out / "done").is_dir():
        raise ValueError(f"{printable(out)} is a latent cache of an earlier sdvae (index.json with safetensors "
                         f"shards); this version writes parquet shards: run cache-latents into a new --out (the "
                         f"images are encoded again), then delete the old folder")


def is_done(out: Path, unit, cache_key: str, report: dict | None = None) -> bool:
    """The unit's completion record says it was done with this key on this input, and its shard is there whole
    (its size: the sha256 is checked by readers, and a rerun reads none of a finished unit's bytes)."""
    try:
        record = json.loads((out / "done" / f"{unit.name}.json").read_text())
        size = (out / record["file"]).stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if record.get("cache_key") != cache_key or record.get("fingerprint") != unit.fingerprint:
        return False
    if size != record.get("bytes"):
        if report is not None:
            report["damaged_shards"].append(dict(file=record["file"], reason=f"{size} bytes, recorded {record['bytes']}"))
        return False
    if report is not None:
        report["reused_units"] += 1
    return True

# ---- encoding one unit ------------------------------------------------------------------------------------

class _UnitCrops(IterableDataset):
    """One unit's images decoded, resized and cropped in loader workers (each takes every k-th image) while the
    main process encodes. Reading problems (sdvae.inputs) and undecodable images come back as error items."""

    def __init__(self, unit, buckets, random_crop: bool, seed: int, max_pixels, image_column: str):
        self.unit, self.buckets, self.random_crop, self.seed = unit, buckets, random_crop, seed
        self.max_pixels, self.image_column = max_pixels, image_column

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        read_skips = []
        for i, sample in enumerate(read_unit(self.unit, read_skips, self.image_column)):
            if i % workers == worker:
                yield self.crop(sample)
        if worker == 0:  # every worker reads the unit; one reports what could not be read
            yield from (dict(key=item["key"], error=item["reason"]) for item in read_skips)

    def crop(self, sample) -> dict:
        digest = hashlib.sha256(sample.data).hexdigest()
        try:
            image = open_image(sample.data, self.max_pixels)  # RGB as a viewer shows it (EXIF rotation applied)
            seed = seed_for(self.seed, int(digest[:15], 16))  # random crops follow the content
            plan = plan_crop(image.size, nearest_bucket(image.size, self.buckets), self.random_crop, seed)
            image = image.resize(plan["resized_size"], Image.Resampling.LANCZOS).crop(plan["crop_box"])
        except Exception as e:  # truncated, empty, not an image: skipped and reported, never the end of the run
            return dict(key=sample.key, error=describe_error(e))
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8: a quarter of fp32 between processes
        return dict(key=sample.key, sha256=digest, pixels=pixels, **plan)


def _as_list(items):
    return items


def _one_thread(_worker_id):
    torch.set_num_threads(1)  # the workers only decode and resize; the encoder keeps the cores


def encode_unit(codec, unit, s: CacheSettings, workers: int) -> tuple[list, list, float]:
    """(rows sorted by key, skipped dict(key, reason), seconds): the same rows whatever the workers and order."""
    started = time.time()
    crops = _UnitCrops(unit, bucket_sizes(s.resolution, not s.no_buckets), s.crop == "random", s.seed,
                       s.max_pixels, s.image_column)
    loader = DataLoader(crops, batch_size=s.batch_size, num_workers=workers, collate_fn=_as_list,
                        worker_init_fn=_one_thread)
    pending, rows, skipped = defaultdict(list), [], []

    def encode(bucket):
        items, pending[bucket] = pending[bucket], []
        x = pixels_to_tensor(torch.stack([it.pop("pixels") for it in items]))  # rows keep only metadata
        mean, std = codec.posterior(torch.cat([x, x.flip(-1)]) if s.flip else x)
        for j, it in enumerate(items):
            it.update(mean=mean[j], std=std[j])
            if s.flip:  # the mirrored crop's own latents (mirroring the latents would not give them)
                it.update(mean_flipped=mean[len(items) + j], std_flipped=std[len(items) + j])
            rows.append(it)

    for items in loader:
        for it in items:
            if "error" in it:
                skipped.append(dict(key=it["key"], reason=it["error"]))
                continue
            pending[it["bucket"]].append(it)
            if len(pending[it["bucket"]]) == s.batch_size:
                encode(it["bucket"])
    for bucket in [b for b in pending if pending[b]]:
        encode(bucket)
    return sorted(rows, key=lambda r: r["key"]), sorted(skipped, key=lambda r: r["key"]), time.time() - started


# ---- writing -----------------------------------------------------------------------------------------------

LATENT_COLUMNS = ("mean", "std", "mean_flipped", "std_flipped")


def shard_table(rows: list, s: CacheSettings) -> pa.Table:
    """The rows as an arrow table whose schema is the same for every shard of a cache (empty ones too)."""
    dtype = LATENT_DTYPES[s.latent_dtype]
    value = pa.float16() if dtype == np.float16 else pa.float32()
    pair = pa.list_(pa.int32(), 2)
    columns = {"key": pa.array([r["key"] for r in rows], pa.string()),
               "sha256": pa.array([r["sha256"] for r in rows], pa.string())}
    for name in ("bucket", "original_size", "resized_size"):
        columns[name] = pa.array([list(r[name]) for r in rows], pair)
    columns["crop_box"] = pa.array([list(r["crop_box"]) for r in rows], pa.list_(pa.int32(), 4))
    columns["crop_box_original"] = pa.array([list(r["crop_box_original"]) for r in rows], pa.list_(pa.float64(), 4))
    for name in LATENT_COLUMNS[:4 if s.flip else 2]:
        columns[name] = nested_lists([r[name].cpu().numpy().astype(dtype) for r in rows], value)
    return pa.table(columns)


def nested_lists(arrays: list[np.ndarray], value_type) -> pa.Array:
    """(C, h, w) arrays (shapes may differ between rows) -> list<list<list<value>>>: what `datasets` reads back as
    nested lists of that shape, with no sdvae code."""
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
    rows = pa.array(flat, value_type)
    for axis in (2, 1, 0):  # innermost lists (of w values) first
        lengths = [a.shape[axis] for a in arrays for _ in range(int(np.prod(a.shape[:axis])))]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        rows = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), rows)
    return rows


def write_unit(out: Path, unit, rows: list, skipped: list, cache_key: str, s: CacheSettings, claims: Claims,
               on_shard, started: float) -> dict:
    """The shard, then its completion record, then the claim's release: a unit is done only once both are whole
    on disk (a kill in between leaves it to be done again)."""
    buffer = io.BytesIO()
    pq.write_table(shard_table(rows, s), buffer, compression="zstd")
    blob = buffer.getvalue()
    name = f"shards/{unit.name}.parquet"
    atomic_write(out / name, blob)
    buckets = defaultdict(int)
    for r in rows:
        buckets[f"{r['bucket'][0]}x{r['bucket'][1]}"] += 1
    record = dict(unit=unit.name, kind=unit.kind, fingerprint=unit.fingerprint, cache_key=cache_key, file=name,
                  sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob), rows=len(rows), buckets=dict(buckets),
                  skipped=skipped, host=socket.gethostname(), pid=os.getpid(), started=started, finished=time.time())
    atomic_json(out / "done" / f"{unit.name}.json", record)
    claims.release(unit.name)
    if on_shard:
        on_shard(record)
    return record


def write_manifest_when_complete(out: Path, units: list, cache_key: str, vae_hash: str, codec, s: CacheSettings):
    """When every unit is done (by whichever processes), the manifest, written by each process that sees it so
    (the same content): format, VAE, factors, settings, every shard; shards of units no longer in the input are
    removed (sdvae wrote them). Returns the manifest, or None while units are left to others."""
    records = []
    for unit in units:
        try:
            record = json.loads((out / "done" / f"{unit.name}.json").read_text())
        except (OSError, ValueError):
            return None
        if record.get("cache_key") != cache_key or record.get("fingerprint") != unit.fingerprint:
            return None
        records.append(record)
    current = {f"{u.name}.parquet" for u in units}
    for old in (out / "shards").glob("*.parquet"):
        if old.name not in current:
            old.unlink(missing_ok=True)  # (another process completing at once may have removed it)
            (out / "done" / f"{old.stem}.json").unlink(missing_ok=True)
    for stale in [*(out / "shards").glob(".*.tmp"), *(out / "done").glob(".*.tmp")]:  # writes killed midway
        stale.unlink(missing_ok=True)
    config = codec.model.config
    factors = {k: config.get(k) for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
               if config.get(k) is not None}
    manifest = dict(format=FORMAT, written_by="sdvae cache-latents", vae_hash=vae_hash, cache_key=cache_key,
                    latent_channels=config.latent_channels, factors=factors,
                    settings=dict(s.keyed(), shard_size=s.shard_size, image_column=s.image_column, split=s.split),
                    images=sum(r["rows"] for r in records), skipped=sum(len(r["skipped"]) for r in records),
                    shards=[{k: r[k] for k in ("unit", "file", "sha256", "bytes", "rows", "buckets")} for r in records])
    atomic_json(out / "manifest.json", manifest)
    atomic_write(out / "README.md", dataset_card(manifest))
    return manifest


def dataset_card(manifest: dict) -> str:
    """The complete cache's card: what it holds and how to read it, with the factors a diffusion trainer needs."""
    factors = ", ".join(f"`{k}` {v}" for k, v in manifest["factors"].items())
    settings = ", ".join(f"{k} {v}" for k, v in manifest["settings"].items())
    return DATASET_CARD + f"""
## This cache

{manifest['images']} images in {len(manifest['shards'])} shards ({manifest['skipped']} unreadable inputs skipped,
each named in `done/<shard>.json`), {manifest['latent_channels']} latent channels. Encoder fingerprint (sha256 of
its weights and config): `{manifest['vae_hash']}`. Factors: {factors}. Settings: {settings}.

```python
import datasets
rows = datasets.load_dataset("<this repo or folder>", streaming=True, split="train")
```
"""
