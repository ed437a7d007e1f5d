"""Pretrained weights that sdvae's losses and metrics need (LPIPS's VGG16 / AlexNet trunks, FID's Inception): found
at a given path, in the torch hub cache, or downloaded there; a missing file is one error that names it and every
place it was looked for."""
from __future__ import annotations

from pathlib import Path

import torch

# torchvision's ImageNet weights that lpips cuts its trunks from (its own linear layers ship in the wheel)
LPIPS_TRUNKS = {"vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
                "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"}



VGG16_URL = LPIPS_TRUNKS["vgg"]



TRUNK_NAMES = {"vgg": "VGG16", "alex": "AlexNet"}



class MissingWeightsError(RuntimeError):
    pass



def hub_cache_path(url: str) -> Path:
    """Where torch hub (torchvision, lpips, pytorch-fid) keeps the file downloaded from `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name



def vgg16_cache_path() -> Path:
    """Where torchvision (and so lpips) keeps the VGG16 ImageNet weights."""
    return hub_cache_path(VGG16_URL)



def weights_file(url: str, path: str | Path | None = None, download: bool = True, what: str = "",
                 hint: str = "") -> Path:
    """The file `url` names: at `path` (a file, or a folder holding it), else in the torch hub cache, else
    downloaded there. MissingWeightsError names the file and every place it was looked for."""
    name = Path(url).name
    if path is not None:
        path = Path(path)
        path = path / name if path.is_dir() else path
        if not path.is_file():
            raise MissingWeightsError(f"{what} not found: {path} (download {url}{hint})")
        return path
    path = hub_cache_path(url)
    if path.is_file():
        return path
    why = "downloads are off"
    if download:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=True)
            return path
        except Exception as e:  # no network, proxy, disk: all end the same way for the user
            why = f"download failed: {e}"
    raise MissingWeightsError(f"{what}: '{name}' is not in the torch hub cache ({path}) and could not be fetched "
                              f"({why}). Download {url} to that path{hint}.")


FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
