"""`sdvae probe`: how well a latent diffusion model learns a VAE's latents, for several VAEs side by side.

1. Latent diagnostics, no training (sdvae.diagnostics): statistics, spectrum, equivariance, noise robustness.
2. The diffusion probe (sdvae.denoiser): the training images are encoded once through the latent cache, the latents
   normalised with their measured factors, and the same denoiser (architecture, init, seed, batches, t and noise)
   is trained on each VAE's latents with rectified flow for the same number of steps; reported are the loss curve,
   the held-out loss on fixed (latent, t, noise) triples, samples from fixed seeds and, where the Inception weights
   are present, their FID against the held-out images.

Every VAE sees the same images and crops. A finished VAE's results are kept in <out>/vaes/ and a denoiser's
checkpoint in <out>/denoisers/, so a killed probe continues where it stopped when run again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import denoiser as dn
from .cache import CacheSettings, build_cache
from .cache_reader import LatentShards
from .checkpoints import _safetensors_problem, _zip_problem
from .codec import load_vae, require_weights
from .config import SEEDS, above, at_least, check_ranges
from .data import _looks_like_hf_dataset, seed_for
from .diagnostics import (downsample_images, equivariance, high_frequency_fraction, noise_robustness, posterior_moments,
                          radial_profile)
from .downloads import MissingWeightsError
from .evaluate import FID_HINT, batches, image_sources
from .files import (LOCK_NAME, FolderLock, atomic_folder, atomic_json, atomic_write, prepare_output_folder, printable,
                    remove_tree)
from .images import pixels_to_tensor, png_bytes, to_uint8
from .inputs import list_images
from .metrics import build_fid_inception, fid_from_features, inception_features
from .probe_report import equivariance_row, image_row, write_outputs
from .weights import as_dtype

FORMAT = 1  # part of every saved result's key: bump it when a measure changes


# every numeric setting's values (each also finite; None passes where the field allows it): see check_ranges
PROBE_RANGES = dict(resolution=at_least(16), steps=at_least(1), minutes=above(0), batch_size=at_least(1),
                    learning_rate=above(0),  # 0 would fall back to the default rate silently
                    seed=SEEDS, eval_every=at_least(1), checkpoint_every=at_least(1), samples=at_least(0),
                    sample_steps=at_least(1), val_images=at_least(2), num_workers=at_least(0),
                    max_pixels=at_least(1))


@dataclass
class ProbeSettings:
    """`sdvae probe`'s settings; the fields are its flags."""
    resolution: int = 256  # images: shorter side resized, centre crop (the eval protocol); latents resolution / 8
    steps: int = 2000  # denoiser optimiser steps, the same for every VAE
    minutes: float | None = None  # instead of steps: the first VAE trains this long, the others as many steps
    denoiser: str = "small"  # small (a UNet for CPUs) | dit-s | dit-b
    batch_size: int = 32
    learning_rate: float | None = None  # default: 2e-4 for the UNet, 1e-4 for DiTs (DiT's rate)
    seed: int = 0
    eval_every: int | None = None  # steps between held-out losses on the curve (default: steps / 10)
    checkpoint_every: int = 500
    samples: int = 64  # samples drawn for samples.png (the first 8) and the generation FID
    sample_steps: int = 25
    val_images: int = 64  # held-out images (from --val-data, or every 10th image of --data)
    mixed_precision: str = "no"  # the denoiser's: no | bf16 | fp16 (GPUs)
    device: str | None = None
    backend: str | None = None  # load_vae's: None is $SDVAE_BACKEND, else auto
    dtype: str = "fp32"  # the VAEs'
    val_data: str | None = None
    split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"
    num_workers: int | None = None
    fid_weights: str | None = None
    no_fid: bool = False
    no_download: bool = False
    max_pixels: int | None = None
    overwrite: bool = False  # write into an --out that holds files sdvae did not write

    def __post_init__(self):
        check_ranges(self, PROBE_RANGES)
        if self.resolution % 16:  # the latents' side must halve for the downscale measure
            raise ValueError(f"resolution must be a multiple of 16 (latents of an even side), got {self.resolution}")
        if self.denoiser not in dn.PRESETS:
            raise ValueError(f"unknown denoiser {self.denoiser!r}; choose from {', '.join(dn.PRESETS)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")

        as_dtype(self.dtype)

    @property
    def rate(self) -> float:
        return self.learning_rate or (2e-4 if dn.PRESETS[self.denoiser]["kind"] == "unet" else 1e-4)


def probe(vaes: dict[str, str], data: str, out: str, settings: ProbeSettings | None = None, **flags) -> dict:
    """Probe every VAE on the same images; writes metrics.json, table.md and the figures to `out` and returns what
    metrics.json holds. Settings: a ProbeSettings, or its fields as keywords."""

    s = dataclasses.replace(settings or ProbeSettings(), **flags)
    if PartialState().num_processes > 1:
        raise ValueError("sdvae probe runs in one process (one GPU); run it without accelerate launch / torchrun")
    train_data, heldout_sources = split_data(data, s)
    out = Path(out)
    prepare_output_folder(out, "probe", s.overwrite or earlier_probe(out))
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with FolderLock(out, "probe"):
        codecs = {}
        for name, path in vaes.items():
            try:
                codecs[name] = load_vae(path, device, as_dtype(s.dtype), backend=s.backend)
                require_weights(codecs[name], "probe")
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"--vae {name}: {e}") from None
        heldout = load_heldout(heldout_sources, s)
        inception, fid_skipped, real_features = load_inception(heldout["pixels"], s, device)
        results = {name: probe_vae(name, codec, str(vaes[name]), train_data, heldout, s, out, inception,
                                   real_features) for name, codec in codecs.items()}
        result = dict(data=str(data), val_data=s.val_data, protocol=protocol(s, heldout, device), vaes=results,
                      image_spectrum=image_spectrum(heldout["x"], s.resolution // 8),
                      heldout_images=heldout["names"], skipped_files=heldout["skipped"], fid_skipped=fid_skipped)
        write_outputs(out, result, heldout)
        return result


def earlier_probe(out: Path) -> bool:
    """A folder a probe wrote before sdvae recorded its outputs (a re-run resumes there): its metrics.json, its
    denoisers/ checkpoints, a latent cache of its layout, or the lock a `sdvae probe` command took."""
    metrics, lock = _json_or_none(out / "metrics.json"), _json_or_none(out / LOCK_NAME)
    return isinstance(metrics, dict) and {"vaes", "protocol", "image_spectrum"} <= set(metrics) \
        or (out / "denoisers").is_dir() or any(out.glob("latents/*/index.json")) \
        or isinstance(lock, dict) and "probe" in str(lock.get("command")).split()


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- data -----------------------------------------------------------------------------------------------------

def split_data(data: str, s: ProbeSettings):
    """(training data, held-out (name, source) pairs): --val-data when given, else every 10th image of --data
    (sorted by path), which training then leaves out. Training data is an image folder (through the latent cache)
    or a `datasets` dataset (encoded in memory). Missing or empty data is an error here, before any model loads."""
    if is_image_folder(data):
        files = list_images(data)
        sources = ((str(f.relative_to(data)), f) for f in files)
    else:
        _, sources = image_sources(data, s.split, s.image_column)  # read lazily: only the held-out rows here
    room = 2 * s.val_images  # twice as many as needed: room for unreadable files
    if s.val_data is not None:
        _, val_sources = image_sources(s.val_data, s.val_split, s.image_column)
        return dict(data=data, leave_out=set()), list(itertools.islice(val_sources, room))
    heldout = list(itertools.islice(sources, 0, 10 * room, 10))
    return dict(data=data, leave_out={name for name, _ in heldout}), heldout


def is_image_folder(data) -> bool:
    path = Path(data)
    return path.is_dir() and not _looks_like_hf_dataset(path)


def load_heldout(sources, s: ProbeSettings) -> dict:
    """The held-out images as the eval protocol crops them: uint8 (N, H, W, 3) and x in [-1, 1]."""
    skipped, names, arrays = [], [], []
    for batch_names, pixels in batches(iter(sources), s.resolution, False, 16, s.val_images, skipped, s.max_pixels):
        names += batch_names
        arrays.append(pixels)
    if len(names) < 2:
        raise ValueError(f"the probe needs at least 2 readable held-out images, found {len(names)}"
                         + (f" (first unreadable: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""))
    pixels = np.concatenate(arrays)
    return dict(names=[printable(n) for n in names], pixels=pixels, x=pixels_to_tensor(pixels), skipped=skipped)


def train_latents(codec, name: str, train_data: dict, s: ProbeSettings, out: Path) -> dict:
    """The training images' posterior means and stds (N, C, h, w), raw, with the mirrored crops as more rows.
    Folders go through the latent cache (<out>/latent-shards/<name>: encoded once, reused when the probe runs again)."""
    data = Path(train_data["data"])
    if is_image_folder(data):
        cache_dir = out / "latent-shards" / name  # (latents/: the index.json caches of earlier versions)
        build_cache(codec, data, cache_dir, CacheSettings(resolution=s.resolution, no_buckets=True, flip=True,
                                                          dtype=s.dtype, num_workers=s.num_workers,
                                                          max_pixels=s.max_pixels, overwrite=s.overwrite),
                    progress=False)
        # keys are "<unit>/<path relative to the folder>"
        items = [it for it in LatentShards(cache_dir, rank=0, world_size=1)
                 if it["key"].split("/", 1)[1] not in train_data["leave_out"]]
        means = [it[k] for it in items for k in ("mean", "mean_flipped")]
        stds = [it[k] for it in items for k in ("std", "std_flipped")]
    else:
        means, stds, skipped = [], [], []
        _, sources = image_sources(str(data), s.split, s.image_column)
        kept = ((n, src) for n, src in sources if n not in train_data["leave_out"])
        for _, pixels in tqdm(batches(kept, s.resolution, False, 16, None, skipped, s.max_pixels),
                              desc=f"encode {name}", unit="batch"):
            x = pixels_to_tensor(pixels)
            for view in (x, x.flip(-1)):
                mean, std = codec.posterior(view)
                means += list(mean.cpu())
                stds += list(std.cpu())
    if len(means) < 2:
        raise ValueError(f"no readable training images in {data} (besides the held-out ones)")
    return dict(mean=torch.stack(means).float(), std=torch.stack(stds).float())


def load_inception(pixels: np.ndarray, s: ProbeSettings, device):
    """(FID network or None, why FID is skipped or None, the held-out images' features)."""
    if s.no_fid:
        return None, "turned off (--no-fid)", None
    if s.samples < 2:
        return None, f"needs at least 2 samples (--samples {s.samples})", None
    try:
        inception = build_fid_inception(s.fid_weights, not s.no_download, FID_HINT).to(device)
    except MissingWeightsError as e:
        return None, str(e), None
    real = np.concatenate([inception_features(inception, torch.from_numpy(pixels[i:i + 32]).permute(0, 3, 1, 2))
                           for i in range(0, len(pixels), 32)])
    return inception, None, real


# --- one VAE ----------------------------------------------------------------------------------------------------

def probe_vae(name, codec, path, train_data, heldout, s, out, inception, real_features) -> dict:
    """Every measure of one VAE; reused from <out>/vaes/<name>.json when it was finished with the same settings."""
    key = result_key(codec.model, train_data, heldout, s)
    saved = out / "vaes" / f"{name}.json"
    previous = finished_result(saved)
    if previous is not None and previous.get("key") == key:
        print(f"probe {name}: finished earlier with the same settings, results reused from {saved}")
        return previous
    seconds = {}
    start = time.time()
    latents = train_latents(codec, name, train_data, s, out)
    stats = posterior_moments(latents["mean"], latents["std"])
    seconds["encode_and_stats"] = time.time() - start

    start = time.time()
    shift, scale = stats["shift_factor"], stats["scaling_factor"]
    encode = lambda x: codec.posterior(x)[0].cpu()
    decode = lambda z: codec.decode(z, scaled=False, output_type="pt")
    x = heldout["x"]
    z = torch.cat([encode(x[i:i + 16]) for i in range(0, len(x), 16)])
    zn = (z - shift) * scale
    measures = dict(spectrum=dict(high_frequency_fraction=high_frequency_fraction(zn),
                                  profile=radial_profile(zn)),
                    equivariance=_batched(lambda i, j: equivariance(encode, decode, x[i:j], z[i:j]), len(x)),
                    noise=_batched(lambda i, j: noise_robustness(decode, x[i:j], z[i:j], scale, list(range(i, j)),
                                                                 s.seed), len(x)))
    seconds["diagnostics"] = time.time() - start

    start = time.time()
    normalised = dict(mean=(latents["mean"] - shift) * scale, std=latents["std"] * scale)
    run = train_probe(name, normalised, zn, s, out)
    seconds["diffusion_probe"] = time.time() - start
    start = time.time()
    samples = draw_samples(run["model"], decode, stats, zn.shape[1:], s)
    gfid = None
    if inception is not None:
        fake = np.concatenate([inception_features(inception, torch.from_numpy(samples[i:i + 32]).permute(0, 3, 1, 2))
                               for i in range(0, len(samples), 32)])
        gfid = fid_from_features(real_features, fake)
    seconds["samples"] = time.time() - start
    # the pictures first: the json says the VAE is finished
    (out / "vaes").mkdir(exist_ok=True)
    atomic_write(out / "vaes" / f"{name}.samples.png", png_bytes(image_row(list(samples[:8]))))
    atomic_write(out / "vaes" / f"{name}.equivariance.png", png_bytes(equivariance_row(encode, decode, x[:2])))
    result = dict(key=key, path=path, latent_channels=stats["channels"], train_images=len(latents["mean"]) // 2,
                  statistics=stats, **measures,
                  probe={k: v for k, v in run.items() if k != "model"}, gfid=gfid,
                  seconds={k: round(v, 2) for k, v in seconds.items()})
    atomic_json(saved, result)
    return result


def finished_result(saved: Path) -> dict | None:
    """A VAE's saved results, or None: not there, or damaged (then said, and measured again)."""
    if not saved.is_file():
        return None
    try:
        result = json.loads(saved.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"{saved} is damaged ({e}): this VAE is measured again")
        return None
    return result if isinstance(result, dict) else None


def _batched(measure, n: int, size: int = 16) -> dict:
    """Run a per-image measure over batches and join its lists."""
    joined = {}
    for i in range(0, n, size):
        for k, v in measure(i, min(n, i + size)).items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    joined.setdefault(k, {}).setdefault(kk, []).extend(vv)
            else:
                joined.setdefault(k, []).extend(v)
    return joined


def result_key(model, train_data: dict, heldout: dict, s: ProbeSettings) -> str:
    """sha256 over the VAE's weights and every setting that changes a figure."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    unscored = ("device", "backend", "num_workers", "fid_weights", "no_download", "checkpoint_every", "overwrite")
    fields = {k: v for k, v in dataclasses.asdict(s).items() if k not in unscored}
    digest.update(json.dumps(dict(fields, format=FORMAT, data=str(train_data["data"]), heldout=heldout["names"]),
                             sort_keys=True).encode())
    return digest.hexdigest()


def train_probe(name: str, latents: dict, heldout_z: torch.Tensor, s: ProbeSettings, out: Path) -> dict:
    """Train the denoiser on one VAE's normalised latents; resumes from <out>/denoisers/<name> when it is there."""
    accelerator = Accelerator(mixed_precision=s.mixed_precision, cpu=(s.device == "cpu"))
    channels, size = heldout_z.shape[1], heldout_z.shape[-1]
    model = dn.build_denoiser(s.denoiser, channels, size, s.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.rate, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    folder = out / "denoisers" / name
    # window: the losses since the last logged mean, kept in checkpoints so that a resumed curve is the same
    state = load_denoiser(folder, model, optimizer, s) or dict(step=0, train_loss=[], heldout_curve=[], window=[])
    steps = planned_steps(out, s)
    triples = dn.heldout_triples(heldout_z, s.seed)
    every = s.eval_every or max(1, (steps or 1000) // 10)
    bar = tqdm(total=steps, initial=state["step"], desc=f"probe {name}", unit="step")
    start, first, window = time.time(), state["step"], state["window"]
    while steps is None or state["step"] < steps:
        z, t, eps = dn.training_batch(latents, state["step"], s.batch_size, s.seed, accelerator.device)
        with accelerator.autocast():
            loss = dn.flow_loss(model, z, t, eps)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        window.append(loss.item())
        bar.update(1)
        if state["step"] % 10 == 0:
            state["train_loss"].append([state["step"], float(np.mean(window))])
            bar.set_postfix(loss=f"{np.mean(window):.4f}")
            window.clear()
        if state["step"] % every == 0:
            state["heldout_curve"].append([state["step"], float(dn.heldout_loss(model, triples).mean())])
        if state["step"] % s.checkpoint_every == 0:
            save_denoiser(folder, model, optimizer, state, s)
        if steps is None and time.time() - start > s.minutes * 60:
            steps = fix_steps(out, state["step"])
    bar.close()
    if state["step"] % s.checkpoint_every:
        save_denoiser(folder, model, optimizer, state, s)  # a probe killed while sampling keeps its denoiser
    final = dn.heldout_loss(model, triples)
    if not state["heldout_curve"] or state["heldout_curve"][-1][0] != state["step"]:
        state["heldout_curve"].append([state["step"], float(final.mean())])
    return dict(model=model, steps=state["step"], train_loss=state["train_loss"], heldout_curve=state["heldout_curve"],
                heldout_loss=float(final.mean()), heldout_loss_per_image=final.mean(1).tolist(),
                heldout_loss_per_t=dict(zip([f"{t:.2f}" for t in dn.T_GRID], final.mean(0).tolist())),
                steps_per_sec=round((state["step"] - first) / max(time.time() - start, 1e-9), 3))


def planned_steps(out: Path, s: ProbeSettings) -> int | None:
    """The steps every VAE trains: --steps, or under --minutes those the first VAE made (kept in plan.json)."""
    if s.minutes is None:
        return s.steps
    plan = out / "plan.json"
    if not plan.is_file():
        return None
    try:
        return int(json.loads(plan.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # the budget the finished VAEs trained with is lost
        raise ValueError(f"{plan} is damaged ({type(e).__name__}: {e}); it holds the steps every VAE trains under "
                         f"--minutes: delete it and {out / 'vaes'} to start the probe's budget again") from None


def fix_steps(out: Path, steps: int) -> int:
    atomic_json(out / "plan.json", {"steps": steps})
    return steps


def save_denoiser(folder: Path, model, optimizer, state: dict, s: ProbeSettings) -> None:
    """The denoiser, its optimiser and the loop's position, written whole or not at all. The checkpoint it
    replaces is kept as <folder>.previous: what a probe resumes from when this one is found damaged."""
    inner = model.module if hasattr(model, "module") else model
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}  # a truncated file is found before it is loaded
        atomic_json(tmp / "state.json", dict(state, settings=_resume_settings(s), files=files))
        if folder.is_dir():  # only once the new one is whole; a kill before it moves in leaves the previous
            remove_tree(previous_checkpoint(folder))
            os.replace(folder, previous_checkpoint(folder))


def previous_checkpoint(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.previous")


def load_denoiser(folder: Path, model, optimizer, s: ProbeSettings) -> dict | None:
    """The saved loop position of the newest intact checkpoint of the same settings: <folder>, else the one it
    replaced (<folder>.previous); None: a fresh start. A damaged checkpoint is named in one warning and moved
    aside to <name>.damaged, so that it never replaces an intact one."""
    candidates = [c for c in (folder, previous_checkpoint(folder)) if c.is_dir()]
    for i, candidate in enumerate(candidates):
        try:
            state = read_denoiser(candidate, model, optimizer, s)
        except ValueError as e:
            aside = candidate.with_name(f"{candidate.name}.damaged")
            remove_tree(aside)
            os.replace(candidate, aside)
            then = f"trying {candidates[i + 1]}" if i + 1 < len(candidates) else "this denoiser starts afresh"
            warnings.warn(f"damaged denoiser checkpoint, moved to {aside}: {e}; {then}")
            continue
        if state is not None:
            print(f"probe: resumed {candidate} at step {state['step']}")
            return state
    return None


def read_denoiser(folder: Path, model, optimizer, s: ProbeSettings) -> dict | None:
    """Load the checkpoint in <folder> into the model and optimiser and return its loop position; None (and nothing
    loaded) when it was saved with other settings. A ValueError naming the file when it is damaged, raised before
    the model or the optimiser changes."""
    problem = denoiser_problem(folder)
    if problem:
        raise ValueError(problem)
    state = json.loads((folder / "state.json").read_text())
    state.pop("files", None)
    if state.pop("settings", None) != _resume_settings(s):
        return None
    inner = model.module if hasattr(model, "module") else model
    try:
        weights = load_file(folder / "model.safetensors")
        saved_optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # past the checks, a file can still be garbage inside
        raise ValueError(f"{folder} cannot be read ({type(e).__name__}: {e})") from None
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in inner.state_dict().items()}:
        raise ValueError(f"{folder / 'model.safetensors'} holds another network than this {s.denoiser} denoiser")
    optimizer.load_state_dict(saved_optimizer)  # it checks its groups before it changes anything
    inner.load_state_dict(weights)
    return state


def denoiser_problem(folder: Path) -> str | None:
    """Why the checkpoint in <folder> cannot be resumed from, or None; checked as sdvae.checkpoints checks a
    training checkpoint: the state parses, each file has the size written, the safetensors header fits its file
    and the optimiser file has its zip index."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
        int(state["step"])
        if not all(isinstance(state[k], list) for k in ("train_loss", "heldout_curve", "window")):
            raise TypeError("its loss lists are not lists")
        sizes = dict(state.get("files", {}))  # none in checkpoints written before the sizes were kept
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"{path} is damaged ({type(e).__name__}: {e})"
    for name in sorted({"model.safetensors", "optimizer.pt", *sizes}):
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
        if name in sizes and (folder / name).stat().st_size != sizes[name]:
            return f"{folder / name} has {(folder / name).stat().st_size} bytes, {sizes[name]} were written"
    return _safetensors_problem(folder / "model.safetensors") or _zip_problem(folder / "optimizer.pt")


def _resume_settings(s: ProbeSettings) -> dict:
    """What a checkpoint must share with the run that resumes it; not the steps, so a probe can be extended."""
    return {k: getattr(s, k) for k in ("denoiser", "batch_size", "learning_rate", "seed", "resolution",
                                       "mixed_precision")}


@torch.no_grad()
def draw_samples(model, decode, stats: dict, shape, s: ProbeSettings) -> np.ndarray:
    """s.samples images from fixed seeds (sample i: noise seeded by (seed, i)), decoded: uint8 (N, H, W, 3)."""
    device = next(model.parameters()).device
    images = []
    for i in range(0, s.samples, 32):
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(s.seed, 13, k)))
                             for k in range(i, min(s.samples, i + 32))])
        zn = dn.sample(model, noise.to(device), s.sample_steps).float().cpu()
        images.append(to_uint8(decode(zn / stats["scaling_factor"] + stats["shift_factor"])))
    return np.concatenate(images) if images else np.zeros((0, s.resolution, s.resolution, 3), np.uint8)


def image_spectrum(x: torch.Tensor, size: int) -> dict:
    """The held-out images' spectrum at the latents' size: the reference the latents are compared with."""
    small = downsample_images(x, (size, size))
    return dict(high_frequency_fraction=high_frequency_fraction(small), profile=radial_profile(small))


def protocol(s: ProbeSettings, heldout: dict, device) -> dict:
    return dict(settings={k: v for k, v in dataclasses.asdict(s).items() if k not in ("fid_weights", "overwrite")},
                learning_rate=s.rate, device=str(device), heldout_images=len(heldout["names"]),
                images=f"shorter side resized to {s.resolution} (bicubic), centre crop; training images through "
                       f"the latent cache (Lanczos, centre crop) with their mirrored crops",
                normalisation="z = (latent - mean) / std with the training latents' global mean and std",
                objective="rectified flow: x_t = (1 - t) z + t eps, predict eps - z, MSE; t ~ U(0, 1), AdamW, "
                          "gradient norm clipped at 1",
                heldout_loss=f"posterior means of the held-out images at t = "
                             f"{', '.join(f'{t:.2f}' for t in dn.T_GRID)}, noise seeded per (image, t); mean over t",
                sampler=f"Euler, {s.sample_steps} steps from t = 1", fid="pytorch-fid InceptionV3 pool3 features, "
                f"{s.samples} samples against the held-out images")
