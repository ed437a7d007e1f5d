"""Latent caching for diffusion training: `sdvae cache-latents --vae X --data D --out CACHE`.

A diffusion trainer that runs the VAE encoder on every image every epoch spends much of its time there; this
encodes each image once. Each image is resized and cropped to an aspect-ratio bucket, and the encoder's
posterior (mean and std, unscaled, stored fp32) is kept, so that the trainer draws a fresh sample
mean + std * eps every epoch, as it would with the encoder in the loop.

    CACHE/index.json                       settings, VAE hash, every shard (file, sha256, bucket) and its rows
    CACHE/shards/shard-XXXXX.safetensors   one bucket shape each: mean, std (N, C, h, w) [+ mean_flipped, std_flipped]
    CACHE/report.json                      the last run: counts, skipped files and why, images/s, settings

An image's key is a sha256 over its file's bytes, the encoder's weights and the settings: a changed file, VAE or
setting gets a new key and is encoded again, and entries whose key no longer matches leave the index. Shards
and the index are written atomically as shards fill, so a killed run continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import list_images, open_image, seed_for
from .sources import dtype_name
from .config import SEEDS, at_least, check_ranges
from .files import FolderLock, atomic_write, describe_error, prepare_output_folder, refuse_foreign_output
from .images import pixels_to_tensor

log = logging.getLogger(__name__)

FORMAT = 1  # part of every key: bump it when the preprocessing changes, so old caches are encoded again


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


class _Crops(Dataset):
    """Decoding, resizing and cropping, done in DataLoader workers while the main process encodes."""

    def __init__(self, files, seeds, buckets, random_crop, max_pixels=None):
        self.files, self.seeds, self.buckets, self.random_crop = files, seeds, buckets, random_crop
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            image = open_image(self.files[i], self.max_pixels)  # RGB as a viewer shows it (EXIF rotation applied)
            plan = plan_crop(image.size, nearest_bucket(image.size, self.buckets), self.random_crop, self.seeds[i])
            image = image.resize(plan["resized_size"], Image.Resampling.LANCZOS).crop(plan["crop_box"])
        except Exception as e:  # truncated, empty, not an image: skipped and reported, never the end of the run
            return dict(index=i, error=describe_error(e))
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8: a quarter of fp32 between processes
        return dict(index=i, pixels=pixels, **plan)


def _as_list(items):
    return items


def _one_thread(_worker_id):
    torch.set_num_threads(1)  # the workers only resize; the encoder keeps the cores


# ---- hashes and atomic files -------------------------------------------------------------------------------

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


def _check_shard(root: Path, shard: dict) -> str | None:
    """None when the shard file exists and matches its checksum, else what is wrong."""
    path = root / shard["file"]
    if not path.is_file():
        return "file missing"
    actual = file_sha256(path)
    if actual != shard["sha256"]:
        return f"sha256 {actual[:12]}... does not match the index's {shard['sha256'][:12]}..."
    return None


# ---- building ----------------------------------------------------------------------------------------------

# every numeric setting's values (each also finite; None passes where the field allows it): see check_ranges
CACHE_RANGES = dict(resolution=at_least(8), batch_size=at_least(1), num_workers=at_least(0), shard_size=at_least(1),
                    seed=SEEDS, max_pixels=at_least(1))


@dataclass
class CacheSettings:
    """`sdvae cache-latents`' settings; the fields are its flags (`--no-buckets` is no_buckets)."""
    resolution: int = 256  # buckets of about resolution^2 pixels
    crop: str = "center"  # center | random
    flip: bool = False  # also store the latents of the mirrored crops
    no_buckets: bool = False  # one square bucket, resolution x resolution
    batch_size: int = 8
    num_workers: int | None = None  # loader processes (default: min(4, CPUs))
    shard_size: int = 1024  # images per shard
    dtype: str = "fp32"  # encoder precision
    device: str | None = None
    backend: str | None = None  # load_vae's: None is $SDVAE_BACKEND, else auto
    seed: int = 0  # seeds the random crops
    max_pixels: int | None = None
    overwrite: bool = False  # write into an --out that holds files sdvae did not write

    def __post_init__(self):
        check_ranges(self, CACHE_RANGES)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples 8x), got {self.resolution}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be center or random, got {self.crop!r}")
        dtype_name(self.dtype)


def build_cache(vae, data, out, settings: CacheSettings | None = None, on_shard=None, progress: bool = True,
                **flags) -> dict:
    """Encode the images under `data` into the cache folder `out`, reusing what is cached there; returns the
    report (also written to out/report.json). `vae` is a path or a loaded `VAECodec` (then `dtype` should name
    its precision: it is part of the key); settings are a CacheSettings or its fields as keywords;
    `on_shard(record)` is called after each shard is written."""
    from .codec import VAECodec, load_vae, require_weights

    s = dataclasses.replace(settings or CacheSettings(), **flags)
    dtype = dtype_name(s.dtype)  # the name, as cache keys have it
    sizes = bucket_sizes(s.resolution, not s.no_buckets)
    data, out = Path(data), Path(out)
    files = list_images(data)  # FileNotFoundError / ValueError (no images) before any model is loaded
    overwrite = s.overwrite or earlier_cache(out)
    refuse_foreign_output(out, overwrite, whole=False)  # before the VAE loads; the folder is made once it has
    workers = min(4, os.cpu_count() or 1) if s.num_workers is None else s.num_workers
    start = time.time()
    codec = vae if isinstance(vae, VAECodec) else load_vae(
        vae, s.device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype, backend=s.backend)
    require_weights(codec, "cache-latents")
    prepare_output_folder(out, "cache-latents", overwrite)
    keyed = dict(resolution=s.resolution, crop=s.crop, flip=s.flip, buckets=not s.no_buckets, dtype=dtype,
                 seed=s.seed if s.crop == "random" else None, format=FORMAT)
    vae_hash = encoder_hash(codec.model)
    current, skipped = _keys(files, data, f"{vae_hash}|{json.dumps(keyed, sort_keys=True)}", workers)
    with FolderLock(out, "cache-latents run"):  # two runs into one cache would replace each other's shards
        shards, todo, reused, damaged = _reuse(out, current)
        writer = _ShardWriter(out, dict(format=FORMAT, settings=keyed, vae_hash=vae_hash, shards=shards), on_shard)

        # workers prepare the crops; here they are batched by bucket, encoded, and gathered into shards
        keys = list(todo)  # identical files share a key and are encoded once
        firsts = [current[todo[k][0]] for k in keys]
        seeds = [seed_for(s.seed, int(digest[:15], 16)) for _, digest, _ in firsts]  # random crops follow the content
        loader = DataLoader(_Crops([path for path, _, _ in firsts], seeds, sizes, s.crop == "random", s.max_pixels),
                            batch_size=s.batch_size, num_workers=workers, collate_fn=_as_list,
                            worker_init_fn=_one_thread)
        bar = tqdm(total=len(keys), desc="cache-latents", unit="img", disable=not progress)
        loop_start = time.time()
        encoded, unreadable = _encode_into_shards(codec, loader, todo, keys, writer, s, bar)
        skipped += unreadable
        loop_seconds = time.time() - loop_start

        report = dict(images=len(files), encoded=encoded, reused=reused, skipped=len(skipped),
                      cached=sum(len(shard["entries"]) for shard in writer.index["shards"]),
                      shards=len(writer.index["shards"]),
                      damaged_shards=damaged, images_per_sec=round(encoded / loop_seconds, 3) if encoded else None,
                      encode_seconds=round(loop_seconds, 2), seconds=round(time.time() - start, 2),
                      settings=dict(keyed, batch_size=s.batch_size, num_workers=workers, shard_size=s.shard_size,
                                    device=str(codec.device), data=str(data)),
                      vae_hash=vae_hash, skipped_files=skipped)
        atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
        return report


def earlier_cache(out: Path) -> bool:
    """A cache written before sdvae recorded its outputs: its index.json (re-runs reuse what it lists)."""
    try:
        return {"shards", "vae_hash"} <= set(json.loads((out / "index.json").read_text()))
    except (OSError, ValueError, TypeError):
        return False


def _encode_into_shards(codec, loader, todo: dict, keys: list, writer, s: CacheSettings, bar) -> tuple[int, list]:
    """The workers' crops, batched by bucket, encoded and gathered into shards: (images encoded, unreadable)."""
    pending, rows = defaultdict(list), defaultdict(list)  # bucket -> crops to encode / encoded rows
    unreadable, encoded = [], 0

    def encode(bucket):
        items, pending[bucket] = pending[bucket], []
        x = pixels_to_tensor(torch.stack([it.pop("pixels") for it in items]))  # rows keep only metadata
        mean, std = codec.posterior(torch.cat([x, x.flip(-1)]) if s.flip else x)
        for j, it in enumerate(items):
            it["paths"], it["key"] = todo[keys[it["index"]]], keys[it["index"]]
            tensors = dict(mean=mean[j], std=std[j])
            if s.flip:  # the mirrored crop's own latents (mirroring the latents would not give them)
                tensors.update(mean_flipped=mean[len(items) + j], std_flipped=std[len(items) + j])
            rows[bucket].append((it, tensors))
        bar.update(len(items))
        while len(rows[bucket]) >= s.shard_size:
            writer.write(bucket, rows[bucket][:s.shard_size])
            rows[bucket] = rows[bucket][s.shard_size:]

    with bar:
        for items in loader:
            for it in items:
                if "error" in it:
                    unreadable += [dict(path=rel, reason=it["error"]) for rel in todo[keys[it["index"]]]]
                    bar.update(1)
                    continue
                pending[it["bucket"]].append(it)
                encoded += 1
                if len(pending[it["bucket"]]) == s.batch_size:
                    encode(it["bucket"])
        for bucket in [b for b in pending if pending[b]]:
            encode(bucket)
        for bucket in [b for b in rows if rows[b]]:
            writer.write(bucket, rows[bucket])
    return encoded, unreadable


def _keys(files: list[Path], data: Path, salt: str, threads: int) -> tuple[dict, list]:
    """relative path -> (file, content sha256, key); files that cannot even be read are skipped."""
    with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL on large reads
        digests = list(pool.map(_try_sha256, files))
    current, skipped = {}, []
    for path, digest in zip(files, digests):
        rel = path.relative_to(data).as_posix()
        if digest.startswith("error:"):
            skipped.append(dict(path=rel, reason=digest[6:]))
        else:
            current[rel] = (path, digest, hashlib.sha256(f"{digest}|{salt}".encode()).hexdigest())
    return current, skipped


def _try_sha256(path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        return f"error:{type(e).__name__}: {e}"


def _reuse(out: Path, current: dict) -> tuple[list, dict, int, list]:
    """What `out` already holds for the current files: the shard records to keep (listing only the current
    paths), the keys still to encode (key -> paths), how many files are reused, and the damaged shards."""
    index = out / "index.json"
    old = json.loads(index.read_text()) if index.is_file() else {"shards": []}
    found, damaged = {}, []  # key -> (shard record, row metadata)
    for shard in old["shards"]:
        problem = _check_shard(out, shard)
        if problem:
            log.warning("shard %s is damaged (%s): its images are encoded again", shard["file"], problem)
            damaged.append(dict(file=shard["file"], reason=problem))
            continue
        for entry in shard["entries"]:
            found.setdefault(entry["key"], (shard, {k: v for k, v in entry.items() if k != "path"}))
    kept, todo, reused = {}, {}, 0
    for rel, (_, _, key) in current.items():
        if key in found:  # also a renamed or copied file: the key is the content's, not the name's
            shard, entry = found[key]
            kept.setdefault(shard["file"], {**shard, "entries": []})["entries"].append(dict(path=rel, **entry))
            reused += 1
        else:
            todo.setdefault(key, []).append(rel)
    return list(kept.values()), todo, reused, damaged


class _ShardWriter:
    """Writes shards and keeps index.json in step: an entry is listed only once its shard is complete on disk."""

    def __init__(self, out: Path, index: dict, on_shard=None):
        self.out, self.index, self.on_shard = out, index, on_shard
        (out / "shards").mkdir(parents=True, exist_ok=True)
        self.write_index()  # stale entries and damaged shards leave the index before anything else is written
        referenced = {Path(s["file"]).name for s in index["shards"]}
        for path in (out / "shards").iterdir():  # their files go too, and any half-written temp file
            if path.is_file() and path.name not in referenced:
                path.unlink()
        self.next = max((int(Path(s["file"]).stem.split("-")[1]) for s in index["shards"]), default=-1) + 1

    def write_index(self):
        atomic_write(self.out / "index.json", json.dumps(self.index, indent=1).encode())

    def write(self, bucket: tuple[int, int], rows: list):
        name = f"shards/shard-{self.next:05d}.safetensors"
        self.next += 1
        tensors = {k: torch.stack([t[k] for _, t in rows]).cpu().contiguous() for k in rows[0][1]}
        meta = dict(format=f"sdvae-latent-cache-{FORMAT}", bucket=f"{bucket[0]}x{bucket[1]}",
                    keys=json.dumps([it["key"] for it, _ in rows]))  # a shard names its rows by itself too
        blob = safetensors_bytes(tensors, metadata=meta)
        atomic_write(self.out / name, blob)
        boxes = ("original_size", "resized_size", "crop_box", "crop_box_original")
        entries = [dict(path=rel, key=it["key"], row=row, **{k: list(it[k]) for k in boxes})
                   for row, (it, _) in enumerate(rows) for rel in it["paths"]]
        record = dict(file=name, sha256=hashlib.sha256(blob).hexdigest(), bucket=list(bucket), rows=len(rows),
                      entries=entries)
        self.index["shards"].append(record)
        self.write_index()
        if self.on_shard:
            self.on_shard(record)


# ---- loading -----------------------------------------------------------------------------------------------

class LatentCache(Dataset):
    """A cache folder as a torch Dataset, one item per image (sorted by path):

        mean, std                    (C, h, w) fp32 tensors, unscaled: scale as your diffusion model expects
        mean_flipped, std_flipped    those of the mirrored crop, when the cache was built with --flip
        path, key, bucket (W, H), original_size (W, H), resized_size, crop_box (in the resized image),
        crop_box_original (in the original image's pixels)

    Items of different buckets have different shapes: batch with `bucket_batches`. Shards are checked against
    their sha256 when opened (`verify=False` skips the check); a mismatch is a ValueError naming the shard.
    """

    def __init__(self, path, verify: bool = True):
        self.root = Path(path)
        if not (self.root / "index.json").is_file():
            raise FileNotFoundError(f"no latent cache in {self.root} (index.json missing); "
                                    f"build one with `sdvae cache-latents`")
        self.index = json.loads((self.root / "index.json").read_text())
        for shard in self.index["shards"] if verify else []:
            problem = _check_shard(self.root, shard)
            if problem:
                raise ValueError(f"latent cache shard {self.root / shard['file']} is damaged ({problem}); "
                                 f"run sdvae cache-latents again to re-encode its images")
        self.rows = sorted(((shard, entry) for shard in self.index["shards"] for entry in shard["entries"]),
                           key=lambda r: r[1]["path"])
        self._open = {}  # shard file -> safe_open handle, opened lazily in each process (memory-mapped)

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": {}}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        shard, entry = self.rows[i]
        if shard["file"] not in self._open:
            self._open[shard["file"]] = safe_open(str(self.root / shard["file"]), "pt")
        f = self._open[shard["file"]]
        item = {name: f.get_slice(name)[entry["row"]] for name in f.keys()}
        item.update(path=entry["path"], key=entry["key"], bucket=tuple(shard["bucket"]))
        item.update({k: tuple(entry[k]) for k in ("original_size", "resized_size", "crop_box", "crop_box_original")})
        return item

    @staticmethod
    def sample(item: dict, generator: torch.Generator | None = None, flipped: bool = False) -> torch.Tensor:
        """A draw z = mean + std * eps from the posterior (unscaled), eps from `generator`."""
        mean, std = (item["mean_flipped"], item["std_flipped"]) if flipped else (item["mean"], item["std"])
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)

    def bucket_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, drop_last: bool = False) -> list:
        """Index batches that each hold one bucket, shuffled by (seed, epoch):
        `DataLoader(cache, batch_sampler=cache.bucket_batches(16, seed, epoch))`."""
        rng = random.Random(seed_for(seed, epoch))
        by_bucket = defaultdict(list)
        for i, (shard, _) in enumerate(self.rows):
            by_bucket[tuple(shard["bucket"])].append(i)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)
                        if not drop_last or k + batch_size <= len(indices)]
        rng.shuffle(batches)
        return batches

    def to_hf_dataset(self):
        """The same rows as a Hugging Face `datasets.Dataset` (in memory, torch format)."""
        import datasets

        columns = defaultdict(list)
        for i in range(len(self)):
            for name, value in self[i].items():
                columns[name].append(value.numpy() if isinstance(value, torch.Tensor) else
                                     list(value) if isinstance(value, tuple) else value)
        return datasets.Dataset.from_dict(dict(columns)).with_format("torch")


def load_cache_as_hf_dataset(path, verify: bool = True):
    return LatentCache(path, verify).to_hf_dataset()
