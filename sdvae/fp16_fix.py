"""`sdvae fp16-check` and `sdvae fp16-fix`: where a VAE overflows half precision, and a copy of it that does not.

fp16-fix changes the decoder only, so the encoder stays bit-identical and cached latents and diffusion models
trained on them stay valid. Three stages, each only while the fp16 decode is still outside the bound:
1. exact rescaling (sdvae.fp16.rescale_exact): activations that GroupNorms make scale-free, an attention's values,
   its queries against its keys and its group_norm's output against the layers that read it are brought below the
   margin by powers of two; the output is unchanged;
2. rescaling through the SiLUs (sdvae.fp16.rescale_through_silu): a GroupNorm channel whose affine output overflows
   on its way into a SiLU is scaled down by a power of two and the next conv's weights on it up; silu is nearly
   linear (or zero) that far from zero, so the fp32 output moves little, and by how much is measured;
3. a short fine-tune through the training loop of the blocks that still hold a layer above the margin and of the
   layers stage 2 changed, with the original VAE's decode of the same latents as the target (output_reference),
   activations above half of fp16's range penalised (activation_weight), and each tensor learning at a rate
   relative to its own size (relative_lr); kept only if its fp16 decode is closer to the original's.
The result is exported with force_upcast false only when its fp16 decode of held-out photos is finite and within
four 8-bit levels of the original's fp32 decode; otherwise the report says how far it got.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from matplotlib.figure import Figure

from .config import load_config
from .demo import holdout_squares, prepare_data
from .export import fp16_check, save_diffusers, save_single_file, ui_incompatibility
from .files import atomic_json, atomic_write, prepare_output_folder, printable, record_output
from .fp16 import FP16_MAX, LEVELS, fp16_report, rescale_exact, rescalings_through_silu
from .images import IMAGE_EXTENSIONS, open_image, pixels_to_tensor, resize_crop
from .inputs import list_images
from .sources import load_pretrained_vae
from .train import train
from .weights import KL, model_kind

MARGIN = FP16_MAX / 8  # what rescaling aims below: it is exact, so it takes all the headroom it can
FINE_TUNE_LIMIT = FP16_MAX / 2  # what the fine-tune penalises above: each step down costs fidelity
# The blocks a fine-tune trains: those holding a layer still above the margin (others stay as they are).
BLOCK = re.compile(r"^decoder\.(?:mid_block|up_blocks\.\d+)\.(?:resnets|attentions|upsamplers)\.\d+")
SILU_AIMS = 4  # rescaling through SiLUs tries MARGIN, MARGIN / 4, / 16 and / 64, while the fp16 decode improves
SHOWN_ROWS = 12  # layers printed: those with the least headroom


def check_images(data: str | None, resolution: int, count: int) -> torch.Tensor:
    """Centre crops of `count` images spread over the folder `data`; without one, the embedded photos' held-out
    squares (sdvae.demo: strips that fp16-fix never trains on)."""
    if data is None:
        squares = holdout_squares(resolution)
        return torch.stack(squares[:: max(1, len(squares) // count)][:count])
    paths = [p for p in list_images(data) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not paths:
        raise ValueError(f"no images in {printable(data)}")
    chosen = paths[:: max(1, len(paths) // count)][:count]
    return torch.stack([pixels_to_tensor(resize_crop(open_image(p), resolution, "eval")) for p in chosen])


def load_kl_vae(source: str):
    vae = load_pretrained_vae(source).float().eval()
    if model_kind(vae) != KL:
        raise ValueError(f"{printable(source)} is a tiny student (AutoencoderTiny): it has no GroupNorms to rescale, "
                         f"and TAESD-style decoders run in fp16 as they are")
    return vae


def fp16_check_command(source: str, out: str | Path, data: str | None = None, resolution: int = 128,
                       max_images: int = 8, overwrite: bool = False) -> dict:
    """The report of `source` on check images: printed as a table, written as fp16-report.json and activations.png."""
    vae = load_kl_vae(source)
    out = prepare_output_folder(out, "fp16-check", overwrite)
    report = fp16_report(vae, check_images(data, resolution, max_images))
    report["source"] = printable(source)
    write_report(out, "fp16-report.json", "activations.png", report, f"{Path(source).name}: max |activation| by depth")
    print("\n".join(report_lines(report)))
    print(f"written: {printable(out / 'fp16-report.json')}, {printable(out / 'activations.png')}")
    return report


def report_lines(report: dict, rows: int = SHOWN_ROWS) -> list[str]:
    """The layers with the least headroom, in depth order, then the verdict."""
    layers = report["layers"]
    tightest = sorted(sorted(range(len(layers)), key=lambda i: layers[i]["headroom"])[:rows])
    lines = [f"{'layer':<48} {'max |activation|':>17} {'headroom to 65504':>18}"]
    for i in tightest:
        row = layers[i]
        over = "  OVERFLOWS fp16" if row["max_abs"] > FP16_MAX else ""
        lines.append(f"{row['name']:<48} {row['max_abs']:>17.4g} {row['headroom']:>17.3g}x{over}")
    lines.append(f"({len(layers) - len(tightest)} more layers with more headroom in the JSON)")
    yes = {True: "finite", False: "NOT finite"}
    lines.append(f"fp16 decode: {yes[report['decode_finite']]}, max difference to fp32 "
                 f"{report['decode_max_diff_levels']:.3g} 8-bit levels; fp16 encode: {yes[report['encode_finite']]}, "
                 f"max latent difference {report['encode_max_diff']:.3g} ({report['images']} images, "
                 f"{report['size'][0]}x{report['size'][1]})")
    lines.append("fp16-safe" if report["safe"] else "NOT fp16-safe: pipelines must upcast it (force_upcast); "
                                                   "sdvae fp16-fix makes a copy that is not")
    return lines


def write_report(out: Path, json_name: str, plot_name: str, report: dict, title: str) -> None:
    atomic_json(out / json_name, report)
    atomic_write(out / plot_name, activation_plot(report, title))


def activation_plot(report: dict, title: str) -> bytes:
    fig = Figure(figsize=(7.2, 4.0))
    ax = fig.add_subplot()
    for part, colour in (("encoder", "tab:blue"), ("decoder", "tab:orange")):
        points = [(i, max(row["max_abs"], 1e-3)) for i, row in enumerate(report["layers"]) if row["part"] == part]
        if points:
            ax.semilogy(*zip(*points), ".", ms=3, color=colour, label=part)
    ax.axhline(FP16_MAX, color="red", lw=1, label="fp16 max (65504)")
    ax.axhline(MARGIN, color="red", lw=0.8, ls="--", label="fp16-fix margin (65504 / 8)")
    ax.set_xlabel("layer, in the order it runs")
    ax.set_ylabel("max |activation| (fp32)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    return buffer.getvalue()


def encoder_identical(a, b) -> bool:
    """Every encoder and quant_conv tensor bit-identical: latents cached with the original stay valid."""
    first, second = a.state_dict(), b.state_dict()
    return all(torch.equal(first[k], second[k]) for k in first if k.startswith(("encoder.", "quant_conv.")))


def fp16_fix_command(source: str, out: str | Path, data: str | None = None, check_data: str | None = None,
                     steps: int = 300, learning_rate: float = 5e-3, resolution: int = 128, batch_size: int = 4,
                     max_images: int = 8, overrides: dict | None = None, overwrite: bool = False,
                     silu_target: float = MARGIN) -> dict:
    """Rescale exactly, then through the SiLUs, then fine-tune, each only while the fp16 decode is still outside the
    bound; export to out/vae (and out/vae.safetensors for the SD architecture) and write fp16-report.json with the
    figures before and after; returns that report. `silu_target`: where the SiLU rescaling aims first (then a
    quarter, and so on, while the fp16 decode gets closer; tests aim it low to make the fine-tune act)."""
    original = load_kl_vae(source)
    out = prepare_output_folder(out, "fp16-fix", overwrite)
    held_out = check_images(check_data, resolution, max_images)
    before = fp16_report(original, held_out)
    result = dict(source=printable(source), before=summary(before), stages=["none: already fp16-safe"], steps=steps)
    if before["safe"]:
        final, check = original, fp16_check(original, held_out)  # left bit-identical
    else:
        def train(start, modules):
            return fine_tune(start, source, out, data, steps, learning_rate, resolution, batch_size,
                             {"train_modules": ",".join(modules) or None, **(overrides or {})})
        final, check = repair(original, held_out, result, silu_target, train if steps > 0 else None)
    after = fp16_report(final, held_out)
    result.update(after=summary(after), check=check, force_upcast=check["force_upcast"],
                  encoder_identical=encoder_identical(original, final))
    write_exports(final, out, source, check)
    atomic_json(out / "fp16-report.json", dict(result, layers_before=before["layers"], layers_after=after["layers"]))
    for name, report in (("before", before), ("after", after)):
        atomic_write(out / f"activations-{name}.png", activation_plot(report, f"{name} fp16-fix: max |activation| "
                                                                                f"by depth"))
    record_output(out, "fp16-fix")
    print("\n".join(fix_lines(result, out)))
    return result


def repair(original, held_out: torch.Tensor, result: dict, silu_target: float, train) -> tuple:
    """Each stage only while the fp16 decode of held_out is outside the bound of the original's fp32 decode: exact
    rescaling, rescaling through the SiLUs, then train(start, modules) when given. Fills result's stages and
    figures; returns (VAE, its fp16 check)."""
    final, result["rescale"] = rescale_exact(original, MARGIN, held_out)
    result["stages"] = ["exact rescaling"]
    check = fp16_check(final, held_out, reference=original)
    if not check["force_upcast"]:
        return final, check
    final, result["silu_rescale"], check = rescale_through_silu_best(final, original, held_out, silu_target, check)
    result["stages"].append("rescaling through SiLUs (approximate)" if result["silu_rescale"]["changed"] else
                            "rescaling through SiLUs: no channel above the margin")
    if not check["force_upcast"] or train is None:
        return final, check
    trained = train(final, modules_to_train(final, result["silu_rescale"]))
    trained_check = fp16_check(trained, held_out, reference=original)
    kept = closer(trained_check, check)
    result["stages"].append(f"fine-tune{'' if kept else ' (not kept: it got no closer)'}")
    return (trained, trained_check) if kept else (final, check)


def rescale_through_silu_best(vae, original, held_out: torch.Tensor, target: float, incumbent: dict) -> tuple:
    """rescale_through_silu of the channels above MARGIN, aimed at target, target / 4, ... while the fp16 decode of
    held_out gets closer to the original's fp32 one: a lower aim costs fp32 accuracy at the SiLU but keeps the next
    conv's weights out of fp16's subnormals. `incumbent`: vae's own fp16 check. Returns (VAE, its result with the
    aims tried, its fp16 check)."""
    best, tried = None, []
    for model, info in rescalings_through_silu(vae, [target / 4 ** k for k in range(SILU_AIMS)], held_out, MARGIN):
        if not info["changed"]:  # nothing above the margin: no aim changes anything, and vae's check stands
            best = (model, info, incumbent)
            break
        check = fp16_check(model, held_out, reference=original)
        tried.append(dict(target=info["target"], fp32_diff_levels=info["fp32_diff_levels"],
                          nonfinite=check["nonfinite"], fp16_diff_levels=check["max_abs_diff"] * LEVELS))
        if best is not None and not closer(check, best[2]):
            break
        best = (model, info, check)
    best[1]["aims"] = tried
    return best


def closer(candidate: dict, incumbent: dict) -> bool:
    """Whether the candidate's fp16 check is better: within the bound where the other is not, else a finite decode
    nearer the original's fp32 one."""
    def rank(check):
        return (check["force_upcast"], check["nonfinite"], check["max_abs_diff"])
    return rank(candidate) < rank(incumbent)


def summary(report: dict) -> dict:
    return {k: report[k] for k in ("decode_finite", "encode_finite", "decode_max_diff_levels", "largest", "safe",
                                    "images", "size")}


def modules_to_train(vae, silu: dict) -> list[str]:
    """The blocks that still hold a layer above the margin, and the layers the SiLU rescaling changed (each norm and
    the convs reading it): those alone learn back the fidelity it cost, which trains better than their whole blocks
    (on the test VAEs, 2.9-5.7 levels after 300 steps where the blocks reached 6.5-9.7)."""
    blocks = blocks_to_train(vae, silu["still_above_target"])
    touched = [name for norm, scaled in silu["scaled"].items() for name in (norm, *scaled["readers"])]
    return blocks + [name for name in touched if not any(name.startswith(block + ".") for block in blocks)]


def blocks_to_train(vae, names: list[str]) -> list[str]:
    """The resnet, attention or upsampler blocks (or top-level layers) holding the layers still above the margin;
    none found: the whole decoder trains."""
    modules, blocks = dict(vae.named_modules()), []
    for name in names:
        match = BLOCK.match(name)
        block = match.group(0) if match else name
        if block not in blocks and (match or not list(modules[block].children())):  # not a whole up block
            blocks.append(block)
    return blocks


def fine_tune(rescaled, source: str, out: Path, data: str | None, steps: int, learning_rate: float, resolution: int,
              batch_size: int, overrides: dict | None):
    """The decoder trained through sdvae's training loop towards the original's outputs, with activations above
    FINE_TUNE_LIMIT penalised; returns the exported result."""
    start = save_diffusers(rescaled, out / "rescaled", overwrite=True)  # inside our own output folder
    if data is None:
        data = str(prepare_data(out / "photos")[0])  # the embedded photos minus the strips the check uses
    values = dict(init_from=str(start), output_reference=source, train_decoder_only=True, activation_weight=1.0,
                  activation_limit=FINE_TUNE_LIMIT, relative_lr=True, learning_rate=learning_rate, lr_warmup_steps=0,
                  lr_schedule="cosine", lr_min_ratio=0.0,
                  max_steps=steps, max_minutes=0.0, data=data, resolution=resolution, batch_size=batch_size,
                  rec_loss="mse", perceptual_weight=0.0, kl_weight=0.0, disc_weight=0.0, ema_decay=0.0,
                  measure_factors=False, sample_posterior=False, checkpoint_every=max(steps, 1),
                  log_every=max(1, steps // 20),
                  output_dir=str(out / "fine-tune"))
    train(load_config(overrides={**values, **(overrides or {})}))
    return load_pretrained_vae(str(out / "fine-tune" / "vae")).float().eval()


def write_exports(vae, out: Path, source: str, check: dict) -> None:
    """out/vae (diffusers) and, where UIs can build the architecture, out/vae.safetensors (the LDM single file)."""
    save_diffusers(vae, out / "vae", fp16=check, overwrite=True)  # out is this command's (prepare_output_folder)
    if ui_incompatibility(vae) is None:
        save_single_file(vae, out / "vae.safetensors", source=source, fp16=check, overwrite=True)


def fix_lines(result: dict, out: Path) -> list[str]:
    before, after, check = result["before"], result["after"], result["check"]

    def row(name, r):
        largest = r["largest"]["decoder"]
        return (f"{name:<8} {'finite' if r['decode_finite'] else 'NOT finite':>12} {r['decode_max_diff_levels']:>14.3g} "
                f"{largest['max_abs']:>16.4g}  {largest['name']}")
    lines = [f"{'':<8} {'fp16 decode':>12} {'diff (levels)':>14} {'max |activation|':>16}  (decoder's largest)",
             row("before", before), row("after", after),
             f"stages: {', '.join(result['stages'])}; encoder bit-identical: {result['encoder_identical']}",
             f"against the original's fp32 decode: fp16 {'NOT finite' if check['nonfinite'] else 'finite'}, "
             f"{check['max_abs_diff'] * LEVELS:.3g} levels (bound 4) -> force_upcast {str(check['force_upcast']).lower()}"]
    if check["force_upcast"]:
        lines.append("not fp16-safe yet: the export keeps force_upcast true. Train longer (--steps), or give the "
                     "fine-tune images like those the VAE will decode (--data)")
    return lines + [f"written: {printable(out / 'vae')} and fp16-report.json"]
