import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from sdvae.images import load_photo
from sdvae.models import build_vae

# PyTorch unless a test asks for load_vae's default "auto" path (tests/test_onnx.py): an ONNX export of each test
# VAE would add minutes. Nothing is cached outside temporary folders. Subprocesses inherit both.
os.environ["SDVAE_BACKEND"] = "pytorch"
os.environ["SDVAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdvae-test-cache-")
atexit.register(shutil.rmtree, os.environ["SDVAE_CACHE_DIR"], ignore_errors=True)

REAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle")


def write_photos(folder, size=96, names=REAL_PHOTOS):
    """Real photos (scikit-image's), downscaled so CPU tests stay fast."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = Image.fromarray(load_photo(name))
        image.thumbnail((size * 2, size * 2))
        image.save(folder / f"{name}.png")
    return folder


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "photos")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random-init tiny VAE saved as a diffusers folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    build_vae("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test gets clean ones."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def random_lpips():
    """LPIPS-VGG with a random trunk: the real package and graph, no download."""
    from sdvae.losses import build_lpips

    return build_lpips(pretrained_trunk=False)


def to_uint8_image(array):
    return Image.fromarray(np.asarray(array, dtype=np.uint8))
