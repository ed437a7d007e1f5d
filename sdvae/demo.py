"""The embedded default: `sdvae train` with no data trains `tiny` on the photos scikit-image ships.

Each photo loses a strip on its right edge to the held-out set (squares of HOLDOUT pixels, twice the training crop,
so that reconstructions.png shows detail), so the PSNR/SSIM reported at the end are measured on pixels the model
never trained on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .downloads import vgg16_cache_path
from .files import prepare_output_folder, refuse_foreign_output
from .images import load_photo, pixels_to_tensor

# Natural photos inside the scikit-image wheel (the rest of skimage.data is synthetic or fetched online).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle", "camera", "moon", "coins", "brick", "grass", "gravel")

# Steps a normal run makes in its 3 minutes: 374 to 431 on 2 idle CPU cores (README, Quickstart).
TYPICAL_STEPS = 370

SETTINGS = dict(  # train/configs/tiny.yaml's recipe (see its comments for what each setting gained)
    model="tiny",
    resolution=64,  # on 2 CPU cores, more steps on small crops beat fewer on large ones
    batch_size=8,  # the pixels of tiny.yaml's step (2 crops of 128 px)
    rec_loss="mse",
    perceptual_weight=0.1,  # used when the VGG16 weights are in the torch hub cache
    posterior_logvar_init=-6.0,
    max_steps=5000,
    max_minutes=3.0,  # about 3 minutes on 2 CPU cores, whichever limit comes first
    learning_rate=4e-4,
    adam_beta1=0.9,
    adam_beta2=0.99,
    lr_warmup_steps=20,
    lr_schedule="cosine",  # ends at the 3-minute mark
    log_every=10,
    sample_every=100,
    checkpoint_every=250,
    output_dir="runs/demo",
)


HOLDOUT = 128


def split_photos(resolution: int = HOLDOUT):
    """(name, the photo minus its right strip, the `resolution` squares down that strip) for each embedded photo.
    A narrower strip lies inside a wider one: squares of any size up to HOLDOUT are held out of HOLDOUT's split."""
    for name in PHOTOS:
        image = Image.fromarray(load_photo(name))
        image.thumbnail((512, 512), Image.Resampling.LANCZOS)  # small crops then hold more of the scene
        photo = np.asarray(image)
        h, w = photo.shape[:2]
        squares = [photo[k * resolution:(k + 1) * resolution, w - resolution:] for k in range(h // resolution)]
        yield name, photo[:, : w - resolution], squares


def prepare_data(root: str | Path, resolution: int = HOLDOUT) -> tuple[Path, Path]:
    """Write train/ (each photo minus its right strip) and holdout/ (`resolution` squares down that strip)."""
    root = Path(root)
    train_dir, holdout_dir = root / "train", root / "holdout"
    train_dir.mkdir(parents=True, exist_ok=True)
    holdout_dir.mkdir(parents=True, exist_ok=True)
    for name, rest, squares in split_photos(resolution):
        Image.fromarray(rest).save(train_dir / f"{name}.png")
        for k, square in enumerate(squares):
            Image.fromarray(square).save(holdout_dir / f"{name}-{k}.png")
    return train_dir, holdout_dir


def holdout_squares(resolution: int = HOLDOUT) -> list[torch.Tensor]:
    """The held-out squares as [-1, 1] tensors, without writing them."""
    return [pixels_to_tensor(square) for _, _, squares in split_photos(resolution) for square in squares]


def demo_defaults(output_dir: str, resolution: int, perceptual_weight_set: bool) -> tuple[dict, str | None]:
    """Settings the demo adds under the user's own; and a notice when LPIPS must be left out."""
    side = max(HOLDOUT, resolution)
    # the demo's photos go into the run folder: the same rule as the run's, and the folder is the run's from now on
    refuse_foreign_output(output_dir, overwrite=False, whole=False, remedy="choose a new or empty output_dir")
    prepare_output_folder(output_dir, "train (demo)", overwrite=True)  # checked just above
    train_dir, holdout_dir = prepare_data(Path(output_dir) / "data", side)
    values = dict(data=str(train_dir), val_data=str(holdout_dir), val_resolution=side)  # scored whole
    notice = None
    if not perceptual_weight_set and not vgg16_cache_path().is_file():
        values["perceptual_weight"] = 0.0
        notice = (f"NOTE: training WITHOUT the perceptual (LPIPS) loss: the VGG16 ImageNet weights are not in the "
                  f"torch hub cache ({vgg16_cache_path()}) and the demo does not download them. "
                  f"Reconstruction and KL losses only.")
    return values, notice
