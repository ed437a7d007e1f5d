"""Training images: a local folder or a Hugging Face dataset, made safe for real-world files.

Every image becomes 8-bit RGB the way a viewer would show it (sdvae.images). A file that cannot be decoded (or is
over max_pixels) is skipped and counted, never a crash: the dataset returns None for it and `collate` reports it.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import random
from pathlib import Path

import datasets
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .images import open_image, pixels_to_tensor, resize_crop
from .inputs import SAVED_DATASET_MARKERS, list_images, list_units, read_unit

log = logging.getLogger(__name__)



def seed_for(*values: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, index...): randomness that depends on position
    only, not on the workers, processes or resumes that got there."""
    h = 0
    for v in values:
        h = (h * 1_000_003 + v) % 2**63
    return h


class ImageTransform:
    """Resize the shorter side up to `resolution` when smaller, crop, flip, scale to [-1, 1].

    Randomness comes from (seed, epoch, index) rather than the worker's RNG, so the crops are the
    same whatever the number of workers and after a resume.
    """

    def __init__(self, resolution: int, random_flip: bool = True, random_crop: bool = True, seed: int = 0,
                 max_pixels: int | None = None):
        self.resolution, self.random_flip, self.random_crop, self.seed = resolution, random_flip, random_crop, seed
        self.max_pixels = max_pixels  # larger files are skipped before they are decoded (sdvae.images.MAX_PIXELS)
        self.epoch = 0
        self.downscale_max = 1.0  # random crops cover up to this many times `resolution`, shrunk to it

    def __call__(self, image: Image.Image, index: int) -> torch.Tensor:
        rng = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, index))
        if self.random_crop and self.downscale_max > 1:
            image = self.zoomed_out(image, rng)
        image = resize_crop(image, self.resolution, "train", rng if self.random_crop else None)
        if self.random_flip and torch.rand(1, generator=rng).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pixels_to_tensor(image)

    def zoomed_out(self, image: Image.Image, rng: torch.Generator) -> Image.Image:
        """A random square of `resolution` x f pixels (f log-uniform in [1, downscale_max], the square within the
        image), shrunk to `resolution` with antialiasing: the crop holds more of the scene, as images resized for
        diffusion training do. Cropped before it is resized, so large photos cost no more than small ones."""
        largest = min(min(image.size), self.resolution * self.downscale_max)
        if largest <= self.resolution:
            return image
        side = round(self.resolution * (largest / self.resolution) ** torch.rand(1, generator=rng).item())
        left, top = (int(torch.randint(n - side + 1, (1,), generator=rng)) for n in image.size)
        return image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC,
                            box=(left, top, left + side, top + side))


class _ImageSource(Dataset):
    """Map-style images: subclasses say where image i comes from (`source`) and what to call it (`name`)."""

    transform: ImageTransform
    decoded: "DecodedImages | None" = None

    def set_epoch(self, epoch: int):
        self.transform.epoch = epoch

    def keep_decoded(self, megabytes: int) -> None:
        """Decode each image once and keep it (until `megabytes` are held): later epochs only crop. Worth it in the
        process that trains; loader workers are copies, made again every epoch."""
        self.decoded = DecodedImages(megabytes) if megabytes > 0 else None

    def __getitem__(self, i):
        image = self.decoded.images.get(i) if self.decoded is not None else None
        if image is None:
            try:
                image = open_image(self.source(i), self.transform.max_pixels)
            except Exception as e:  # any undecodable file: count it, never kill the run
                return _skipped(self.name(i), e)
            if self.decoded is not None:
                self.decoded.add(i, image)
        return _crop(image, self.name(i), self.transform, i)

    def centre_cropped(self):
        """The same images, centre-cropped and unflipped (for validation), without listing them again."""
        view = copy.copy(self)
        view.transform = ImageTransform(self.transform.resolution, random_flip=False, random_crop=False,
                                        max_pixels=self.transform.max_pixels)
        return view


class ImageFolder(_ImageSource):
    def __init__(self, root, resolution: int, random_flip: bool = True, random_crop: bool = True,
                 seed: int = 0, max_pixels: int | None = None):
        self.files = list_images(root)
        self.transform = ImageTransform(resolution, random_flip, random_crop, seed, max_pixels)

    def __len__(self):
        return len(self.files)

    def source(self, i):
        return self.files[i]

    def name(self, i):
        return str(self.files[i])


class DecodedImages:
    """Decoded RGB images by index, up to a memory budget (the first ones that fit stay)."""

    def __init__(self, megabytes: int):
        self.images, self.free = {}, megabytes * 2**20

    def add(self, index: int, image: Image.Image) -> None:
        size = image.width * image.height * 3
        if size <= self.free:
            self.images[index], self.free = image, self.free - size


def _load(source, name: str, transform, index: int) -> dict:
    try:
        image = open_image(source, transform.max_pixels)
    except Exception as e:  # any undecodable file: count it, never kill the run
        return _skipped(name, e)
    return _crop(image, name, transform, index)


def _crop(image: Image.Image, name: str, transform, index: int) -> dict:
    try:
        return {"pixel_values": transform(image, index), "name": name}
    except Exception as e:
        return _skipped(name, e)


def _skipped(name: str, error: Exception) -> dict:
    return {"pixel_values": None, "name": name, "error": f"{type(error).__name__}: {error}"}


class HFImageDataset(_ImageSource):
    """A map-style `datasets` dataset; images are decoded here so bad ones can be skipped."""

    def __init__(self, dataset, image_column: str, resolution: int, random_flip=True, random_crop=True, seed=0,
                 max_pixels=None):
        if image_column not in dataset.column_names:
            raise ValueError(f"image column '{image_column}' not in the dataset; columns: {dataset.column_names}")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.column = dataset, image_column
        self.transform = ImageTransform(resolution, random_flip, random_crop, seed, max_pixels)

    def __len__(self):
        return len(self.dataset)

    def source(self, i):
        return self.dataset[i][self.column]

    def name(self, i):
        return f"{self.column}[{i}]"


class HFStreamingImageDataset(IterableDataset):
    def __init__(self, dataset, image_column: str, resolution: int, random_flip=True, random_crop=True, seed=0,
                 max_pixels=None):
        if dataset.features is not None and image_column in dataset.features and isinstance(
                dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.column = dataset, image_column
        self.transform = ImageTransform(resolution, random_flip, random_crop, seed, max_pixels)

    def set_epoch(self, epoch: int):
        self.transform.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        for i, row in enumerate(self.dataset):
            if self.column not in row:
                raise ValueError(f"image column '{self.column}' not in the dataset; columns: {list(row)}")
            yield _load(row[self.column], f"{self.column}[{i}]", self.transform, i)


class ShardImageDataset(IterableDataset):
    """webdataset tar shards (sdvae.inputs reads them), unit after unit in an order shuffled per epoch; each loader
    worker reads its own units, and images are shuffled within a buffer. Accelerate hands the batches to the
    processes, as for streamed `datasets`."""

    def __init__(self, units: list, image_column: str, resolution: int, random_flip=True, random_crop=True, seed=0,
                 max_pixels=None, buffer: int = 256):
        self.units, self.column, self.seed, self.buffer = units, image_column, seed, buffer
        self.transform = ImageTransform(resolution, random_flip, random_crop, seed, max_pixels)

    def set_epoch(self, epoch: int):
        self.transform.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(seed_for(self.seed, self.transform.epoch, worker))
        units = list(self.units)
        random.Random(seed_for(self.seed, self.transform.epoch)).shuffle(units)
        pending = []
        for unit in units[worker::workers]:
            skipped = []
            for sample in read_unit(unit, skipped, self.column):
                pending.append(sample)
                if len(pending) >= self.buffer:
                    yield self.load(pending.pop(rng.randrange(len(pending))))
            yield from (_skipped_item(item["key"], item["reason"]) for item in skipped)
        rng.shuffle(pending)
        yield from map(self.load, pending)

    def load(self, sample) -> dict:
        index = int(hashlib.sha256(sample.key.encode()).hexdigest()[:15], 16)  # crops follow the image, not its turn
        return _load(sample.data, sample.key, self.transform, index)


def _skipped_item(name: str, reason: str) -> dict:
    return {"pixel_values": None, "name": name, "error": reason}


def is_shard_pattern(data: str) -> bool:
    """webdataset tar shards: a path, brace pattern or glob of .tar files."""
    return str(data).rstrip("/").endswith(".tar")


def build_dataset(data: str, resolution: int, image_column: str = "image", split: str = "train",
                  streaming: bool = False, random_flip: bool = True, random_crop: bool = True, seed: int = 0,
                  max_pixels: int | None = None):
    """A folder of images, webdataset tar shards, or a `datasets` dataset by hub name or local path. Errors early on
    empty input."""
    if is_shard_pattern(data):
        return ShardImageDataset(list_units(data, image_column=image_column, split=split), image_column, resolution,
                                 random_flip, random_crop, seed, max_pixels)
    path = Path(data)
    if path.is_dir() and not _looks_like_hf_dataset(path):
        return ImageFolder(path, resolution, random_flip, random_crop, seed, max_pixels)

    try:
        if path.is_dir() and any((path / m).exists() for m in SAVED_DATASET_MARKERS):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"{data} has no split '{split}'; it has {', '.join(dataset)}")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(data, split=split, streaming=streaming)
    except FileNotFoundError:
        raise FileNotFoundError(f"data not found: '{data}' is neither an image folder nor a loadable dataset") from None
    except ConnectionError as e:  # a hub name with no network and nothing in the HF cache
        raise FileNotFoundError(f"data not found: '{data}' is not a local folder, and the Hugging Face hub could "
                                f"not be reached for it ({e})") from None
    if streaming and not isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.to_iterable_dataset()
    if isinstance(dataset, datasets.IterableDataset):
        return HFStreamingImageDataset(dataset, image_column, resolution, random_flip, random_crop, seed, max_pixels)
    return HFImageDataset(dataset, image_column, resolution, random_flip, random_crop, seed, max_pixels)


def _looks_like_hf_dataset(path: Path) -> bool:
    return (any((path / m).exists() for m in SAVED_DATASET_MARKERS) or any(path.glob("*.parquet"))
            or any(path.glob("data/**/*.parquet")))  # the hub's layout


def collate(items):
    """Stack the good images; report the skipped ones by name and reason."""
    good = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    skipped = [(it["name"], it["error"]) for it in items if it["pixel_values"] is None]
    pixels = torch.stack(good) if good else torch.empty(0)
    return {"pixel_values": pixels, "skipped": skipped}
