"""`sdvae eval`: reconstruction metrics of several VAEs on the same images, with the published protocol.

Protocol (sd-vae-ft-mse's model card: COCO 2017 val at 256x256): the shorter side is resized to the resolution
(bicubic), the centre square cropped and stored as 8 bits; each VAE encodes it with its posterior mode (or a
sample), decodes, and the output is clamped and quantised to 8 bits before it is compared with the 8-bit input.
`full_size=True` keeps the images as they are (Kodak and similar sets): the codec reflect-pads them to a
multiple of 8 and crops the decoded image back.

Every VAE sees every batch in turn, so the images are read once, the real-image Inception features are
computed once, and only the images shown in the grid are kept in memory.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from scipy import stats
from tqdm.auto import tqdm

from .codec import load_vae
from .config import SEEDS, at_least, check_ranges
from .data import HFImageDataset, ImageFolder, build_dataset
from .downloads import LPIPS_TRUNKS, MissingWeightsError
from .files import atomic_json, atomic_write, describe_error, prepare_output_folder, printable, refuse_foreign_output
from .images import open_image, pixels_to_tensor, png_bytes, resize_crop
from .losses import build_lpips
from .metrics import build_fid_inception, fid_from_features, inception_features, psnr_batch, ssim_batch, summarise
from .pictures import caption
from .weights import as_dtype

LABELS = {"rfid": "rFID", "psnr": "PSNR", "ssim": "SSIM", "lpips_vgg": "LPIPS-VGG", "lpips_alex": "LPIPS-Alex"}
FEWER_IS_BETTER = {"rfid", "lpips_vgg", "lpips_alex"}
LPIPS_HINT = ", or pass --lpips-weights FOLDER_OR_FILE, or --no-lpips"
FID_HINT = ", or pass --fid-weights FOLDER_OR_FILE, or --no-fid"


def parse_vae_specs(specs: list[str]) -> dict[str, str]:
    """["NAME=PATH" or "PATH", ...] -> {name: path}; a bare path is named after its file or folder."""
    vaes = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():  # a path that itself contains "=" stays a path
            name, path = Path(spec.rstrip("/")).stem or spec, spec
        if name in vaes:
            raise ValueError(f"two VAEs are called '{name}'; label them with --vae NAME=PATH")
        vaes[name] = path
    if not vaes:
        raise ValueError("no VAE given (--vae PATH or --vae NAME=PATH)")
    return vaes


def image_sources(data: str, split: str = "validation", image_column: str = "image"):
    """(number of images, iterator of (name, source)) for an image folder (names relative to it) or a `datasets`
    dataset: a `save_to_disk` folder, a folder of parquet files, or a hub name. Sources are read lazily."""
    # FileNotFoundError / ValueError("no images ...") here, before any model loads; the transform goes unused
    dataset = build_dataset(data, 8, image_column, split, random_flip=False, random_crop=False)
    if isinstance(dataset, ImageFolder):
        return len(dataset), ((str(f.relative_to(data)), f) for f in dataset.files)
    if not isinstance(dataset, HFImageDataset):
        raise ValueError(f"{data}: expected an image folder or a map-style `datasets` dataset")
    return len(dataset), ((dataset.name(i), dataset.source(i)) for i in range(len(dataset)))


def batches(sources, resolution: int, full_size: bool, batch_size: int, max_images: int | None, skipped: list,
            max_pixels: int | None = None):
    """Yield (names, uint8 (B, H, W, 3)) batches of one size from (name, source) pairs; unreadable images go to
    `skipped`, not the run."""
    pending: dict[tuple, list] = {}  # full size: one queue per image size, since a batch holds one size
    count = 0
    for name, source in sources:
        if max_images is not None and count >= max_images:
            break
        where = printable(source) if isinstance(source, Path) else name  # a file by its path, a row by column[i]
        try:
            image = open_image(source, max_pixels)
        except Exception as e:
            skipped.append({"path": where, "reason": describe_error(e)})
            continue
        image = image if full_size else resize_crop(image, resolution, "eval")
        array = np.asarray(image)
        if min(array.shape[:2]) < 11:
            skipped.append({"path": where, "reason": f"{image.width}x{image.height}: SSIM needs 11x11 pixels"})
            continue
        count += 1
        queue = pending.setdefault(array.shape, [])
        queue.append((name, array))
        if len(queue) == batch_size:
            yield _flush(queue)
        elif sum(map(len, pending.values())) > 4 * batch_size:  # many sizes: never hold much of the set
            yield _flush(max(pending.values(), key=len))
    for queue in pending.values():
        if queue:
            yield _flush(queue)


def _flush(queue: list) -> tuple[list[str], np.ndarray]:
    names, arrays = [n for n, _ in queue], np.stack([a for _, a in queue])
    queue.clear()
    return names, arrays


def _given_file(paths: list[str], name: str, key: str) -> Path | None:
    """The first of `paths` that is the file `name` (or names the network `key`) or a folder holding `name`."""
    for p in map(Path, paths):
        if p.is_dir() and (p / name).is_file():
            return p / name
        if p.is_file() and (p.name == name or key in p.name.lower()):
            return p
    return None


def load_scorers(lpips_weights: list[str] | None, fid_weights: str | None, use_lpips: bool, use_fid: bool,
                 download: bool, device) -> tuple[dict, object, dict]:
    """({'lpips_vgg': model, 'lpips_alex': model}, inception model or None, {metric: why it is skipped})."""
    lpips_models, skipped, inception = {}, {}, None
    for net in ("vgg", "alex"):
        metric = f"lpips_{net}"
        if not use_lpips:
            skipped[metric] = "turned off (--no-lpips)"
            continue
        name = Path(LPIPS_TRUNKS[net]).name
        given = _given_file(lpips_weights or [], name, net)
        try:
            lpips_models[metric] = build_lpips(given, download, net=net, hint=LPIPS_HINT).to(device)
        except MissingWeightsError as e:
            searched = f"not among --lpips-weights {', '.join(lpips_weights)}; " if lpips_weights else ""
            skipped[metric] = searched + str(e)
    if not use_fid:
        skipped["rfid"] = "turned off (--no-fid)"
    else:
        try:
            inception = build_fid_inception(fid_weights, download, FID_HINT).to(device)
        except MissingWeightsError as e:
            skipped["rfid"] = str(e)
    return lpips_models, inception, skipped


# every numeric setting's values (each also finite; None passes where the field allows it): see check_ranges
EVAL_RANGES = dict(resolution=at_least(8), seed=SEEDS, batch_size=at_least(1), max_images=at_least(1),
                   grid_images=at_least(0), max_pixels=at_least(1))


@dataclass
class EvalSettings:
    """`sdvae eval`'s settings; the fields are its flags (`--full-size` is full_size), checked as TrainConfig is."""
    resolution: int = 256  # shorter side and centre crop
    full_size: bool = False  # images as they are (Kodak and similar sets)
    sample: bool = False  # decode a posterior sample (seeded) instead of the mode
    seed: int = 0
    batch_size: int = 8
    device: str | None = None
    backend: str | None = None  # load_vae's: None is $SDVAE_BACKEND, else auto
    dtype: str = "fp32"
    max_images: int | None = None
    lpips_weights: list[str] | None = None
    fid_weights: str | None = None
    no_lpips: bool = False
    no_fid: bool = False
    no_download: bool = False
    grid_images: int = 3
    split: str = "validation"
    image_column: str = "image"
    max_pixels: int | None = None
    overwrite: bool = False  # write into an --out that holds files sdvae did not write

    def __post_init__(self):
        check_ranges(self, EVAL_RANGES)
        if not self.full_size and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples 8x), got {self.resolution}")

        as_dtype(self.dtype)


def evaluate(vaes: dict[str, str], data: str, out: str, settings: EvalSettings | None = None, **flags) -> dict:
    """Score every VAE on the same images and write metrics.json, per_image.csv, table.md, grid.png and
    psnr.png to `out`. Returns what metrics.json holds. Settings: an EvalSettings, or its fields as keywords."""
    s = dataclasses.replace(settings or EvalSettings(), **flags)
    dtype = as_dtype(s.dtype)
    total, sources = image_sources(data, s.split, s.image_column)
    out = Path(out)
    # an unusable or foreign --out fails now, not after the whole evaluation; it is made once the VAEs load
    overwrite = s.overwrite or earlier_eval(out)
    refuse_foreign_output(out, overwrite, whole=False)
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codecs = {}
    for name, path in vaes.items():
        try:
            codecs[name] = load_vae(path, device, dtype, backend=s.backend)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"--vae {name}: {e}") from None
    prepare_output_folder(out, "eval", overwrite)
    lpips_models, inception, skipped_metrics = load_scorers(s.lpips_weights, s.fid_weights, not s.no_lpips,
                                                            not s.no_fid, not s.no_download, device)
    run = score_all(codecs, sources, total, s, lpips_models, inception, device)
    names, values, seconds = run["names"], run["values"], run["seconds"]
    if not names:
        first = run["skipped_files"][0]
        raise ValueError(f"none of the {total} files in {data} could be read as an image "
                         f"(first: {first['path']}: {first['reason']})")

    summary = {v: {**summarise(values[v]), "path": str(vaes[v]),
                   "images_per_sec": round(len(names) / seconds[v], 3) if seconds[v] else None} for v in vaes}
    notes = add_rfid(summary, run["features"], inception, len(names), skipped_metrics)
    paired = [paired_difference(values[a][m], values[b][m], a, b, m)
              for i, a in enumerate(vaes) for b in list(vaes)[i + 1:] for m in values[a]]
    protocol = describe_protocol(s.resolution, s.full_size, s.sample, s.seed, dtype, device)
    result = {"data": str(data), "images": len(names), "protocol": protocol, "vaes": summary,
              "skipped_metrics": skipped_metrics, "paired": paired, "notes": notes,
              "skipped_files": run["skipped_files"]}
    write_outputs(out, result, names, run["sizes"], values, run["shown"])
    return result


def earlier_eval(out: Path) -> bool:
    """A folder eval wrote before sdvae recorded its outputs: its metrics.json (with eval's keys) and table.md."""
    try:
        keys = set(json.loads((out / "metrics.json").read_text()))
    except (OSError, ValueError, TypeError):
        return False
    return {"vaes", "protocol", "skipped_metrics"} <= keys and (out / "table.md").is_file()


def score_all(codecs: dict, sources, total: int, s: EvalSettings, lpips_models: dict, inception, device) -> dict:
    """Every VAE on the same batches: per-image scores, Inception features, time, and the grid's images."""
    vaes = list(codecs)
    metrics = ["psnr", "ssim"] + [m for m in ("lpips_vgg", "lpips_alex") if m in lpips_models]
    expected = total if s.max_images is None else min(total, s.max_images)
    shown = {}  # grid slot -> first image in its stretch of the set: spread over the set, unreadable files or not
    names, sizes = [], []
    values = {v: {m: [] for m in metrics} for v in vaes}
    features = {"input": [], **{v: [] for v in vaes}}
    seconds = dict.fromkeys(vaes, 0.0)
    generators = {v: torch.Generator().manual_seed(s.seed) for v in vaes}  # each VAE draws the same noise
    skipped_files: list[dict] = []
    progress = tqdm(total=expected, desc="eval", unit="img")
    for batch_names, inputs in batches(sources, s.resolution, s.full_size, s.batch_size, s.max_images,
                                       skipped_files, s.max_pixels):
        h, w = inputs.shape[1:3]
        real = torch.from_numpy(inputs).permute(0, 3, 1, 2).to(device)
        if inception is not None:
            features["input"].append(inception_features(inception, real))
        reconstructions = {}
        for v, codec in codecs.items():
            start = time.perf_counter()
            reconstructions[v] = reconstruct_batch(codec, inputs, s.sample, generators[v])
            seconds[v] += time.perf_counter() - start
            fake = torch.from_numpy(reconstructions[v]).permute(0, 3, 1, 2).to(device)
            for metric, scores in score_batch(real, fake, lpips_models).items():
                values[v][metric] += scores
            if inception is not None:
                features[v].append(inception_features(inception, fake))
        for i, n in enumerate(batch_names):
            slot = (len(names) + i) * s.grid_images // expected
            if s.grid_images and slot not in shown:
                shown[slot] = (n, inputs[i], {v: reconstructions[v][i] for v in vaes})
        names += batch_names
        sizes += [(w, h)] * len(batch_names)
        progress.update(len(batch_names))
    progress.close()
    return dict(names=names, sizes=sizes, values=values, features=features, seconds=seconds, shown=shown,
                skipped_files=skipped_files)


def reconstruct_batch(codec, inputs: np.ndarray, sample: bool, generator) -> np.ndarray:
    """(B, H, W, 3) uint8 -> the VAE's reconstruction, clamped and 8-bit, at the input's size."""
    h, w = inputs.shape[1:3]
    z = codec.encode(pixels_to_tensor(inputs), scaled=False, sample=sample, generator=generator)
    rec = codec.decode(z, size=(w, h), scaled=False, output_type="np")
    if codec.device.type == "cuda":  # the time is the VAE's, not the queue's
        torch.cuda.synchronize(codec.device)
    return rec


@torch.no_grad()
def score_batch(real: torch.Tensor, fake: torch.Tensor, lpips_models: dict) -> dict[str, list]:
    """Per-image PSNR, SSIM and each LPIPS of 8-bit (B, 3, H, W) batches."""
    scores = {"psnr": psnr_batch(real, fake).tolist(), "ssim": ssim_batch(real, fake).tolist()}
    for metric, model in lpips_models.items():  # LPIPS takes [-1, 1]
        scores[metric] = model(pixels_to_tensor(fake), pixels_to_tensor(real)).flatten().tolist()
    return scores


def add_rfid(summary: dict, features: dict, inception, images: int, skipped_metrics: dict) -> list[str]:
    """Each VAE's rFID into `summary`; returns the notes on how far it can be trusted."""
    if inception is None:
        return []
    if images < 2:
        skipped_metrics["rfid"] = f"rFID needs at least 2 images, got {images}"
        return []
    real = np.concatenate(features["input"])
    for v in summary:
        summary[v]["rfid"] = fid_from_features(real, np.concatenate(features[v]))
    if images >= 2048:
        return []
    return [f"rFID from {images} images is statistically weak: with fewer images than the 2048 Inception feature "
            f"dimensions the covariances are singular, and the value is biased upwards by a set-size-dependent "
            f"amount. Compare rFIDs only on the same images; the published figures use 5000 (COCO 2017 val)."]


def write_outputs(out: Path, result: dict, names, sizes, values, shown) -> None:
    """Every output whole or not at all (the scores exist now), names escaped where they are not UTF-8."""
    atomic_json(out / "metrics.json", result)
    atomic_write(out / "per_image.csv", per_image_csv(names, sizes, values))
    atomic_write(out / "table.md", markdown_table(result))
    if shown:  # (name, input, {vae: reconstruction}) for each image in the grid
        atomic_write(out / "grid.png", png_bytes(comparison_figure(list(shown.values()), list(values), values, names)))
    buffer = io.BytesIO()
    psnr_plot(values, result).savefig(buffer, dpi=100, format="png")
    atomic_write(out / "psnr.png", buffer.getvalue())


def describe_protocol(resolution, full_size, sample, seed, dtype, device) -> dict:
    return {
        "images": ("full size, reflect-padded to a multiple of 8 and cropped back" if full_size else
                   f"shorter side resized to {resolution} (bicubic), centre crop {resolution}x{resolution}"),
        "latent": f"posterior sample (seed {seed})" if sample else "posterior mode",
        "output": "decoded, clamped to [-1, 1], quantised to 8 bits, compared with the 8-bit input",
        "resolution": None if full_size else resolution, "full_size": full_size, "sample": sample, "seed": seed,
        "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "psnr": "8-bit, peak 255", "ssim": "Gaussian window 11, sigma 1.5, on [0, 1], per channel then averaged",
        "lpips": "lpips package v0.1, VGG and AlexNet trunks, inputs in [-1, 1]",
        "rfid": "pytorch-fid InceptionV3 pool3 (2048-d) features of the inputs vs the reconstructions",
    }


def paired_difference(a: list[float], b: list[float], name_a: str, name_b: str, metric: str) -> dict:
    """Mean of the per-image differences b - a, with a 95% t confidence interval (the images are the pairs)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    d = d[np.isfinite(d)]  # PSNR is inf where a VAE reproduces an image exactly
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"a": name_a, "b": name_b, "metric": metric, "mean_difference": mean, "ci95": [mean - half, mean + half],
            "images": n}


def paired_table(paired: list[dict], label, fewer_is_better, digits) -> list[str]:
    """Markdown lines for `paired_difference` results; label, fewer_is_better and digits are functions of the
    metric. "better" names the VAE the interval favours, or — where it holds 0."""
    if not paired:
        return []
    lines = ["", "Paired comparison (per-image difference B − A, mean and 95% confidence interval):", "",
             "| A | B | metric | mean B − A | 95% CI | better |", "|---|---|---|---:|---|---|"]
    for d in paired:
        lo, hi = d["ci95"]
        better = "—"
        if lo > 0 or hi < 0:  # the interval excludes 0
            better = d["b"] if (lo > 0) != fewer_is_better(d["metric"]) else d["a"]
        k = digits(d["metric"])
        lines.append(f"| {d['a']} | {d['b']} | {label(d['metric'])} | {d['mean_difference']:+.{k}f} | "
                     f"[{lo:+.{k}f}, {hi:+.{k}f}] | {better} |")
    return lines


def per_image_csv(names, sizes, values) -> str:
    metrics = list(next(iter(values.values())))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image", "width", "height", "vae"] + metrics)
    for i, (name, (w, h)) in enumerate(zip(names, sizes)):
        for v in values:
            writer.writerow([printable(name), w, h, v] + [f"{values[v][m][i]:.6g}" for m in metrics])
    return text.getvalue()


def _pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(result: dict) -> str:
    """One row per VAE, as the sd-vae-ft-mse model card (rFID, then mean ± std of the per-image metrics)."""
    p = result["protocol"]
    lines = [f"Reconstruction on `{result['data']}`: {result['images']} images; {p['images']}; {p['latent']}; "
             f"{p['output']}.", "",
             "| VAE | " + " | ".join(LABELS.values()) + " |", "|---|" + "---:|" * len(LABELS)]
    for v, s in result["vaes"].items():
        cells = []
        for m in LABELS:
            if m in result["skipped_metrics"]:
                cells.append("skipped")
            elif m == "rfid":
                cells.append(f"{s['rfid']:.2f}")
            else:
                cells.append(_pm(s[f"{m}_mean"], s[f"{m}_std"], 2 if m == "psnr" else 4))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "PSNR in dB (higher is better), SSIM higher is better; LPIPS and rFID lower is better. "
                  "Mean ± standard deviation over the images."]
    lines += paired_table(result["paired"], LABELS.get, lambda m: m in FEWER_IS_BETTER,
                          lambda m: 3 if m == "psnr" else 4)
    if result["skipped_metrics"]:
        lines += ["", "Skipped metrics:"]
        lines += [f"- {LABELS[m]}: {why}" for m, why in result["skipped_metrics"].items()]
    if result["notes"]:
        lines += ["", *[f"Note: {n}" for n in result["notes"]]]
    if result["skipped_files"]:
        lines += ["", f"{len(result['skipped_files'])} unreadable files skipped (listed in metrics.json)."]
    lines += ["", "VAEs: " + "; ".join(f"{v} = `{s['path']}`" for v, s in result["vaes"].items())]
    return "\n".join(lines) + "\n"


# --- pictures -----------------------------------------------------------------------------------------------

TILE = 320  # longest side of a tile in the grid: larger images are shown scaled down, their crops at 4x
GAP = 4  # white pixels between tiles


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()


def detail_box(image: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """Top-left corner of the width x height window with the most edges: where reconstructions differ most."""
    g = image.astype(np.float64).mean(-1)
    edges = np.abs(np.diff(g, axis=0))[:, :-1] + np.abs(np.diff(g, axis=1))[:-1, :]
    s = np.pad(edges.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = min(height, edges.shape[0]), min(width, edges.shape[1])
    windows = s[height:, width:] - s[:-height, width:] - s[height:, :-width] + s[:-height, :-width]
    y, x = np.unravel_index(np.argmax(windows), windows.shape)
    return int(x), int(y)


def comparison_figure(grid, vaes: list[str], values, names: list[str], zoom: int = 4) -> Image.Image:
    """Per image three rows: input | each VAE; the same detailed crop zoomed `zoom`x (nearest); the per-pixel
    error |reconstruction - input| (mean over channels, 8-bit levels) as a heat map, one scale per image."""

    cmap = colormaps["inferno"]
    font, label = _font(11), 18  # one line of caption above each tile, shortened to the tile's width
    w0, h0 = max(g[1].shape[1] for g in grid), max(g[1].shape[0] for g in grid)
    scale = min(1.0, TILE / max(h0, w0))
    tw, th = round(w0 * scale), round(h0 * scale)  # one tile size that holds every image shown
    columns = 1 + len(vaes)
    rows = []
    for name, image, recs in grid:
        ih, iw = image.shape[:2]
        s = min(1.0, tw / iw, th / ih)  # never enlarged: the crops show the pixels
        size = (max(1, round(iw * s)), max(1, round(ih * s)))
        cw, ch = min(iw, tw // zoom), min(ih, th // zoom)
        x0, y0 = detail_box(image, cw, ch)
        errors = {v: np.abs(r.astype(np.float32) - image.astype(np.float32)).mean(-1) for v, r in recs.items()}
        vmax = max(1.0, float(np.percentile(np.stack(list(errors.values())), 99)))
        i = names.index(name)
        block = Image.new("RGB", (columns * (tw + GAP) - GAP, 3 * (th + label) + GAP), "white")
        draw = ImageDraw.Draw(block)

        def put(col, row, picture, *texts):
            block.paste(picture, (col * (tw + GAP), row * (th + label) + label))
            draw.text((col * (tw + GAP) + 2, row * (th + label) + 3), caption(texts, tw - 4, font), fill="black",
                      font=font)

        def full(a):
            return Image.fromarray(a).resize(size, Image.Resampling.LANCZOS) if s != 1 else Image.fromarray(a)

        def crop(a):
            return Image.fromarray(a[y0:y0 + ch, x0:x0 + cw]).resize((cw * zoom, ch * zoom), Image.Resampling.NEAREST)

        def heat(e):
            e = Image.fromarray(e).resize(size, Image.Resampling.BOX) if s != 1 else Image.fromarray(e)
            return Image.fromarray((cmap(np.clip(np.asarray(e) / vmax, 0, 1))[..., :3] * 255).astype(np.uint8))

        shown = full(image)
        ImageDraw.Draw(shown).rectangle([x0 * s, y0 * s, (x0 + cw) * s - 1, (y0 + ch) * s - 1], outline=(0, 255, 0))
        put(0, 0, shown, *([f"{Path(name).name} (shown at {s:.2g}x)"] if s != 1 else []), Path(name).name)
        put(0, 1, crop(image), f"input, crop at {zoom}x", f"input {zoom}x")
        bar = np.linspace(0, 1, tw)[None, :].repeat(max(1, th // 6), 0)
        put(0, 2, Image.fromarray((cmap(bar)[..., :3] * 255).astype(np.uint8)),
            f"|error| scale: 0 .. {vmax:.0f} levels", f"|error| 0..{vmax:.0f} levels", f"0..{vmax:.0f}/255")
        for c, v in enumerate(vaes, start=1):
            p, q = values[v]['psnr'][i], values[v]['ssim'][i]
            put(c, 0, full(recs[v]), f"{v}: {p:.2f} dB, SSIM {q:.3f}", f"{v}: {p:.1f} dB {q:.3f}", f"{p:.1f} dB {v}")
            put(c, 1, crop(recs[v]), f"{v}, crop at {zoom}x", f"{v} {zoom}x")
            put(c, 2, heat(errors[v]), f"{v}: |error|", f"{v} error")
        rows.append(block)
    figure = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for k, r in enumerate(rows):
        figure.paste(r, (0, k * r.height))
    return figure


def psnr_plot(values, result):
    """Per-image PSNR per VAE: violin, box and the images as points."""

    vaes = list(values)
    data = [np.asarray(values[v]["psnr"])[np.isfinite(values[v]["psnr"])] for v in vaes]
    fig = Figure(figsize=(1.6 + 1.4 * len(vaes), 4.2))
    ax = fig.add_subplot()
    if all(len(d) > 1 for d in data):
        ax.violinplot(data, showextrema=False)
    ax.boxplot(data, widths=0.15, showfliers=False)
    rng = np.random.default_rng(0)
    for k, d in enumerate(data, start=1):
        ax.scatter(k + rng.uniform(-0.08, 0.08, len(d)), d, s=8, alpha=0.6, color="black", zorder=3)
    ax.set_xticks(range(1, len(vaes) + 1), [textwrap.fill(v, 18) for v in vaes])  # 1.4 in a VAE
    ax.set_ylabel("PSNR (dB)")
    size = "full size" if result["protocol"]["full_size"] else f"{result['protocol']['resolution']} px"
    title = f"{'/'.join(Path(result['data']).parts[-2:])}: {result['images']} images, {size}"
    fig.suptitle(textwrap.fill(title, round(fig.get_figwidth() * 100 / 9)), fontsize=10)  # 9 px a letter, at most
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
