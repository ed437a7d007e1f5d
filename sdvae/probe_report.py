"""What `sdvae probe` writes: metrics.json, table.md, spectrum.png, probe_loss.png, samples.png, equivariance.png."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from .denoiser import white_noise_loss
from .diagnostics import transforms
from .evaluate import _font, paired_difference, paired_table
from .files import atomic_json, atomic_write
from .images import png_bytes, to_uint8
from .pictures import label_band, stack

GAP = 4
# what each combined picture's columns hold, written above it
EXPLAINED = {
    "samples": "Samples from the probe's denoiser, decoded: column i starts from the same noise (seed, i) for "
               "every VAE.",
    "equivariance": "Per image: x (the input), then for each transform T (x/2: downscale 2x, rot: rotate 90 "
                    "degrees) T(x) and D(T(z)), the decoded transformed latent; they match for an equivariant VAE.",
}
# per-image figures compared between VAEs: (label, where in a VAE's result, fewer is better)
PAIRED = {
    "held-out loss": (("probe", "heldout_loss_per_image"), True),
    "downscale PSNR": (("equivariance", "downscale_2x", "psnr"), False),
    "rotate PSNR": (("equivariance", "rotate_90", "psnr"), False),
    "PSNR at σ=0.25": (("noise", "sigma_0.25"), False),
}


def write_outputs(out: Path, result: dict, heldout: dict) -> None:
    vaes = list(result["vaes"])
    result["paired"] = []
    for label, (where, _) in PAIRED.items():
        for i, a in enumerate(vaes):
            for b in vaes[i + 1:]:
                d = paired_difference(_get(result["vaes"][a], where), _get(result["vaes"][b], where), a, b, label)
                result["paired"].append(d)
    atomic_json(out / "metrics.json", result)
    atomic_write(out / "table.md", markdown_table(result))
    atomic_write(out / "spectrum.png", _figure_png(spectrum_plot(result)))
    atomic_write(out / "probe_loss.png", _figure_png(loss_plot(result)))
    for picture in ("samples", "equivariance"):
        rows = {v: Image.open(out / "vaes" / f"{v}.{picture}.png") for v in vaes
                if (out / "vaes" / f"{v}.{picture}.png").is_file()}
        if rows:
            atomic_write(out / f"{picture}.png", png_bytes(labelled_rows(rows, EXPLAINED[picture])))


def _get(result: dict, where: tuple):
    for key in where:
        result = result[key]
    return result


def _mean(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def markdown_table(result: dict) -> str:
    p = result["protocol"]
    s = p["settings"]
    lines = [f"Diffusion probe on `{result['data']}`: {p['heldout_images']} held-out images"
             f"{' from `' + str(result['val_data']) + '`' if result['val_data'] else ''}, {s['resolution']} px; "
             f"denoiser `{s['denoiser']}`, {next(iter(result['vaes'].values()))['probe']['steps']} steps of batch "
             f"{s['batch_size']}, lr {p['learning_rate']:g}, seed {s['seed']}.", "",
             "| VAE | channels | scale / shift | in use | HF energy | downscale PSNR (gap) | rotate PSNR (gap) | "
             "PSNR σ=0 / 0.25 / 0.5 | held-out loss | gFID |",
             "|---|---:|---|---:|---:|---|---|---|---:|---:|"]
    for v, r in result["vaes"].items():
        st, eq, noise = r["statistics"], r["equivariance"], r["noise"]
        gfid = f"{r['gfid']:.1f}" if r.get("gfid") is not None else "skipped"
        lines.append(
            f"| {v} | {st['channels']} | {st['scaling_factor']:.4g} / {st['shift_factor']:+.3g} | "
            f"{st['channels_in_use']} | {r['spectrum']['high_frequency_fraction']:.3f} | "
            + " | ".join(f"{_mean(eq[t]['psnr']):.2f} ({_mean(eq[t]['gap']):+.2f})" for t in transforms())
            + f" | {_mean(noise['sigma_0']):.2f} / {_mean(noise['sigma_0.25']):.2f} / {_mean(noise['sigma_0.5']):.2f}"
            f" | {r['probe']['heldout_loss']:.4f} | {gfid} |")
    images = result["image_spectrum"]["high_frequency_fraction"]
    lines += ["", f"HF energy: fraction of the normalised latents' spectral energy above half the Nyquist frequency "
                  f"(white noise 0.75; the held-out images at the latents' size: {images:.3f}). Downscale / rotate: "
                  f"PSNR of decode(T(z)) against T(x), in brackets the gap to decode(encode(T(x))), 0 for an "
                  f"equivariant VAE. σ: PSNR of decode(z + σ·ε) on the normalised scale. Held-out loss: rectified-"
                  f"flow MSE on fixed (latent, t, noise) triples, lower is easier to learn (latents without any "
                  f"structure, white noise, score {white_noise_loss():.3f} at best). Means over the held-out images; "
                  f"in use: channels with KL above 0.01 nats per element."]
    lines += paired_table(result["paired"], str, lambda figure: PAIRED[figure][1], lambda figure: 4)
    if result["fid_skipped"]:
        lines += ["", f"gFID skipped: {result['fid_skipped']}"]
    if result["skipped_files"]:
        lines += ["", f"{len(result['skipped_files'])} unreadable held-out files skipped (listed in metrics.json)."]
    lines += ["", "Wall time (s): " + "; ".join(
        f"{v}: " + ", ".join(f"{k.replace('_', ' ')} {t:.0f}" for k, t in r["seconds"].items())
        for v, r in result["vaes"].items())]
    lines += ["", "VAEs: " + "; ".join(f"{v} = `{r['path']}`" for v, r in result["vaes"].items())]
    return "\n".join(lines) + "\n"


# --- figures ------------------------------------------------------------------------------------------------

def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    return buffer.getvalue()


def spectrum_plot(result: dict):
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    f, p = result["image_spectrum"]["profile"]
    ax.semilogy(f, p, "k--", label=f"images at latent size ({result['image_spectrum']['high_frequency_fraction']:.2f})")
    for v, r in result["vaes"].items():
        f, p = r["spectrum"]["profile"]
        ax.semilogy(f, p, label=f"{v} ({r['spectrum']['high_frequency_fraction']:.2f})")
    ax.axvline(0.25, color="grey", lw=0.8)
    ax.set_xlabel("radial frequency (cycles per latent pixel; Nyquist 0.5)")
    ax.set_ylabel("power per coefficient (normalised)")
    ax.set_title("Latent spectra; in brackets the energy fraction above 0.25", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_plot(result: dict):
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for k, (v, r) in enumerate(result["vaes"].items()):
        colour = f"C{k}"
        train = np.asarray(r["probe"]["train_loss"])
        if len(train):
            ax.plot(train[:, 0], train[:, 1], color=colour, alpha=0.35, lw=0.8)
        held = np.asarray(r["probe"]["heldout_curve"])
        ax.plot(held[:, 0], held[:, 1], "o-", color=colour, ms=3,
                label=f"{v} (held-out {r['probe']['heldout_loss']:.3f})")
    ax.set_xlabel("denoiser step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("Training loss (faint, mean of 10 steps) and held-out loss (points)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def image_row(arrays: list, labels: list[str] | None = None) -> Image.Image:
    """uint8 (H, W, 3) arrays side by side, top-aligned, on white; `labels` (one per array) above them."""
    if not arrays:
        return Image.new("RGB", (1, 1), "white")
    width = sum(a.shape[1] for a in arrays) + GAP * (len(arrays) - 1)
    row = Image.new("RGB", (width, max(a.shape[0] for a in arrays)), "white")
    x, columns = 0, []
    for a in arrays:
        row.paste(Image.fromarray(a), (x, 0))
        columns.append((x, a.shape[1]))
        x += a.shape[1] + GAP
    if labels is None:
        return row
    return stack(label_band([(x, w, t) for (x, w), t in zip(columns, labels)], width), row)


@torch.no_grad()
def equivariance_row(encode, decode, x: torch.Tensor) -> Image.Image:
    """For each image: x | T(x), decode(T(z)) for each transform."""
    z = encode(x)
    arrays = []
    for i in range(len(x)):
        arrays.append(to_uint8(x[i:i + 1])[0])
        for image_t, latent_t in transforms().values():
            arrays += [to_uint8(image_t(x[i:i + 1]))[0], to_uint8(decode(latent_t(z[i:i + 1])))[0]]
    return image_row(arrays, len(x) * equivariance_labels())


def equivariance_labels() -> list[str]:
    """Column titles of one image in equivariance_row, short enough for narrow columns."""
    short = {"downscale_2x": ("x/2", "D(z/2)"), "rotate_90": ("rot x", "D(rot z)")}
    return ["x"] + [t for name in transforms() for t in short.get(name, ("T x", "D(T z)"))]


def labelled_rows(rows: dict, title: str = "") -> Image.Image:
    """One row per VAE, its name above it; `title` (wrapped) on top. A row of equal square tiles without labels of
    its own (samples) gets its columns numbered."""
    width = max(r.width for r in rows.values())
    parts = [label_band([(0, width, title)], width)] if title else []
    for name, row in rows.items():
        parts += [label_band([(0, width, name)], width, _font()), numbered(row)]
    return stack(*parts)


def numbered(row: Image.Image) -> Image.Image:
    """`row` with "1", "2", ... above its tiles where it is n square tiles GAP apart, else as it is."""
    n = (row.width + GAP) // (row.height + GAP)
    if n < 2 or n * (row.height + GAP) - GAP != row.width:
        return row
    side = row.height
    return stack(label_band([(k * (side + GAP), side, str(k + 1)) for k in range(n)], row.width), row)
