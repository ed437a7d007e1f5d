"""Reading a latent cache (sdvae.cache) as a stream: shards split by rank and by loader worker, checked against
the manifest's sha256 as they are read, one bucket per batch, never the whole cache in memory.

    shards = LatentShards("latents/", shuffle=True, seed=0)
    loader = DataLoader(shards.batches(16), batch_size=None, num_workers=4)
    for batch in loader:                      # mean, std: (B, C, h, w) of one bucket; key, bucket, ...
        z = (LatentShards.sample(batch, generator) - shift) * scale

Tools without sdvae read the same shards with `datasets.load_dataset("latents/", streaming=True)`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .data import seed_for
from .files import printable

LATENT_COLUMNS = ("mean", "std", "mean_flipped", "std_flipped")
BOXES = ("bucket", "original_size", "resized_size", "crop_box", "crop_box_original")


def read_manifest(path: str | Path) -> dict:
    """The cache's manifest; one error that says what the folder is when it has none."""
    root = Path(path)
    if (root / "manifest.json").is_file():
        try:
            manifest = json.loads((root / "manifest.json").read_text())
            if manifest.get("format") == 2:
                return manifest
        except (OSError, ValueError, AttributeError):
            pass
        raise ValueError(f"{printable(root / 'manifest.json')} is not a latent cache manifest sdvae can read")
    if (root / "index.json").is_file():
        raise ValueError(f"{printable(root)} is a latent cache of an earlier sdvae (index.json): run sdvae "
                         f"cache-latents into a new folder to write this version's parquet shards")
    if (root / "done").is_dir():
        done = len(list((root / "done").glob("*.json")))
        raise ValueError(f"the latent cache {printable(root)} is incomplete ({done} units done, no manifest yet): run "
                         f"the same sdvae cache-latents command again to finish it")
    raise FileNotFoundError(f"no latent cache in {printable(root)} (no manifest.json): build one with sdvae "
                            f"cache-latents")


class LatentShards(IterableDataset):
    """The cache's rows as items: mean, std (C, h, w) fp32 tensors, unscaled [mean_flipped, std_flipped]; key,
    sha256, bucket (W, H), original_size, resized_size, crop_box, crop_box_original. Each process (RANK /
    WORLD_SIZE, or `rank` / `world_size`) and each of its loader workers reads its own shards."""

    def __init__(self, path, shuffle: bool = False, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, verify: bool = True):
        self.root, self.manifest = Path(path), read_manifest(path)
        self.shuffle, self.seed, self.verify, self.epoch = shuffle, seed, verify, 0
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.factors = self.manifest["factors"]

    def __len__(self) -> int:
        return self.manifest["images"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[dict]:
        shards = [s for s in self.manifest["shards"] if s["rows"]]
        if self.shuffle:
            random.Random(seed_for(self.seed, self.epoch)).shuffle(shards)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return shards[self.rank * workers + worker::self.world_size * workers]

    def __iter__(self):
        for shard in self.my_shards():
            rows = list(self.read_shard(shard))
            if self.shuffle:
                random.Random(seed_for(self.seed, self.epoch, int(shard["sha256"][:12], 16))).shuffle(rows)
            yield from rows

    def read_shard(self, shard: dict):
        path = self.root / shard["file"]
        blob = path.read_bytes()
        if self.verify and hashlib.sha256(blob).hexdigest() != shard["sha256"]:
            raise ValueError(f"latent cache shard {printable(path)} is damaged (its sha256 does not match the "
                             f"manifest); run sdvae cache-latents again to re-encode its images")
        channels = self.manifest["latent_channels"]
        for batch in pq.ParquetFile(io.BytesIO(blob)).iter_batches():
            plain = {name: batch.column(name).to_pylist() for name in ("key", "sha256", *BOXES)}
            latents = {name: split_rows(batch.column(name), plain["bucket"], channels)
                       for name in LATENT_COLUMNS if name in batch.schema.names}
            for i, key in enumerate(plain["key"]):
                item = {name: tuple(plain[name][i]) for name in BOXES}
                item.update(key=key, sha256=plain["sha256"][i], **{n: v[i] for n, v in latents.items()})
                yield item

    def batches(self, batch_size: int, drop_last: bool = False) -> "BucketBatches":
        """Batches of `batch_size` items of one bucket each (for DataLoader(..., batch_size=None))."""
        return BucketBatches(self, batch_size, drop_last)

    @staticmethod
    def sample(item: dict, generator: torch.Generator | None = None, flipped: bool = False) -> torch.Tensor:
        """A draw z = mean + std * eps from the posterior (unscaled), eps from `generator`."""
        mean, std = (item["mean_flipped"], item["std_flipped"]) if flipped else (item["mean"], item["std"])
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def split_rows(column, buckets: list, channels: int) -> list[torch.Tensor]:
    """A list<list<list<float>>> column -> a (C, h, w) fp32 tensor per row, without Python lists of floats."""
    flat = column.flatten().flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    shapes = [(channels, h // 8, w // 8) for w, h in buckets]
    ends = np.cumsum([int(np.prod(shape)) for shape in shapes])
    return [torch.from_numpy(flat[end - int(np.prod(shape)):end].reshape(shape)) for shape, end in zip(shapes, ends)]


class BucketBatches(IterableDataset):
    """Items gathered per bucket and given out as batches of one bucket: mean, std (B, C, h, w); the other fields
    as lists."""

    def __init__(self, shards: LatentShards, batch_size: int, drop_last: bool):
        self.shards, self.batch_size, self.drop_last = shards, batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)

    def __iter__(self):
        pending = defaultdict(list)
        for item in self.shards:
            bucket = pending[item["bucket"]]
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield collate(bucket)
                bucket.clear()
        for items in pending.values():
            if items and not self.drop_last:
                yield collate(items)


def collate(items: list[dict]) -> dict:
    batch = {}
    for name in items[0]:
        values = [it[name] for it in items]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
