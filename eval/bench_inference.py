"""Encode/decode speed and memory: sdvae's codec against diffusers' AutoencoderKL on identical weights.

    python eval/bench_inference.py            # this machine's CPU, writes eval/results/bench_inference_cpu.*
    python eval/bench_inference.py --sizes 256 512 1024 --batches 1 8 --dtypes fp32 bf16 fp16 \\
        --memory-sizes 2048 4096 8192 --compile                    # on a GPU

Weights: the SD architecture (`sd-kl-f8`) at random init (seed 0), saved once and loaded by both sides.
Speed rows: diffusers = `AutoencoderKL.decode/encode` in eager mode (fp32, or bf16/fp16 autocast as diffusers
users run it); ours = `sdvae.load_vae(...)`'s default (fp32 on the CPU: onnxruntime on the graphs it exports and
caches; otherwise channels-last PyTorch in the dtype's weights), untiled; tiled = ours with the
seam-free tiling forced on. "max |diff|" is against diffusers' output of the same row, on [-1, 1].
Memory rows: each decode runs in a fresh process; peak = the process's peak resident memory during the call
(VmHWM, reset just before it) or peak allocated memory (GPU), above what it held before the call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdvae.weights import DTYPE_NAMES as DTYPES  # noqa: E402


def timed(fn, budget_s: float):
    """Median seconds of fn() over repeats that fit in budget_s (at least one), after one warm-up call when a
    call is short enough to afford it."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = [first] if first * 2 > budget_s else []
    while not times or (sum(times) + first < budget_s and len(times) < 5):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def native_low_precision(dtype) -> bool:
    if torch.cuda.is_available():
        return True
    return "AVX512" in torch.backends.cpu.get_cpu_capability() or dtype == torch.float32


def speed_rows(folder, device, sizes, batches, dtypes, compile_, budget_s, tiled_from):
    from diffusers import AutoencoderKL

    import sdvae

    reference = AutoencoderKL.from_pretrained(folder).to(device).eval()
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        if not native_low_precision(dtype):
            print(f"skipping {dtype_name}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native "
                  f"{dtype_name} arithmetic; its convolutions run 10-500x slower than fp32 here")
            continue
        ours = sdvae.load_vae(folder, device, dtype)
        variants = {"ours": ours}
        if compile_:
            variants["ours+compile"] = sdvae.load_vae(folder, device, dtype, compile=True)
        for size in sizes:
            for batch in batches:
                g = torch.Generator().manual_seed(size)
                x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
                z = torch.randn(batch, 4, size // 8, size // 8, generator=g).to(device)
                for direction in ("decode", "encode"):
                    def run_reference():
                        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                            if direction == "decode":
                                return reference.decode(z).sample.float().clamp(-1, 1)
                            return reference.encode(x).latent_dist.mode().float()

                    base_s, base = timed(run_reference, budget_s)
                    row = dict(direction=direction, size=size, batch=batch, dtype=dtype_name,
                               diffusers_img_s=batch / base_s)
                    print(f"{direction} {size} b{batch} {dtype_name}: diffusers {base_s:.2f} s", flush=True)
                    for name, codec in variants.items():
                        for tiled in (False, True) if size >= tiled_from and name == "ours" else (False,):
                            def run_ours():
                                if direction == "decode":
                                    return codec.decode(z, scaled=False, tiled=tiled, output_type="pt").to(device)
                                return codec.encode(x, scaled=False, tiled=tiled)

                            seconds, out = timed(run_ours, budget_s)
                            key = name + (" tiled" if tiled else "")
                            row[f"{key}_img_s"] = batch / seconds
                            row[f"{key}_vs_diffusers"] = base_s / seconds
                            row[f"{key}_max_diff"] = (out.float() - base.to(out.device)).abs().max().item()
                            print(f"  {key}: {seconds:.2f} s ({base_s / seconds:.2f}x), max |diff| "
                                  f"{row[f'{key}_max_diff']:.2e}", flush=True)
                    rows.append(row)
    return rows


def backend_rows(folder, size, budget_s):
    """fp32 encode and decode of one size x size image on the CPU through each execution path: diffusers eager
    (the reference), ours on PyTorch (channels-last eager), ours + torch.compile, ours traced + frozen +
    torch.jit.optimize_for_inference (oneDNN's prepacked convolutions), and the default (onnxruntime on the
    graphs load_vae exports and caches on the first load). Encode is timed for the reference, PyTorch and the
    default."""
    from diffusers import AutoencoderKL

    import sdvae

    reference = AutoencoderKL.from_pretrained(folder).eval()
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(size))
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    with torch.no_grad():
        base_s, base = timed(lambda: reference.decode(z).sample.clamp(-1, 1), budget_s)
        base_encode_s, base_z = timed(lambda: reference.encode(x).latent_dist.mode(), budget_s)
    print(f"{size}: diffusers eager decode {base_s:.2f} s, encode {base_encode_s:.2f} s", flush=True)
    paths = {
        "ours, PyTorch (channels-last eager)": lambda: sdvae.load_vae(folder, backend="pytorch"),
        "ours + torch.compile": lambda: sdvae.load_vae(folder, compile=True),
        "ours + oneDNN (trace, freeze, optimize_for_inference)": lambda: onednn_codec(folder, z),
        "ours, default (onnxruntime on cached graphs)": lambda: sdvae.load_vae(folder),
    }
    rows = [dict(path="diffusers eager", size=size, seconds=base_s, vs_diffusers=1.0, max_diff=0.0,
                 encode_s=base_encode_s, encode_vs_diffusers=1.0)]
    for name, make in paths.items():
        started = time.perf_counter()
        codec = make()  # the default's first load exports its graphs: kept apart with the first call
        codec.decode(z, scaled=False, tiled=False, output_type="pt")
        row = dict(path=name, size=size, setup_s=time.perf_counter() - started)
        row["seconds"], out = timed(lambda: codec.decode(z, scaled=False, tiled=False, output_type="pt"), budget_s)
        row.update(vs_diffusers=base_s / row["seconds"], max_diff=(out.float() - base).abs().max().item())
        if "compile" not in name and "oneDNN" not in name:
            row["encode_s"], latent = timed(lambda: codec.encode(x, scaled=False, tiled=False), budget_s)
            row.update(encode_vs_diffusers=base_encode_s / row["encode_s"],
                       encode_max_diff=(latent - base_z).abs().max().item())
        if "default" in name:
            started = time.perf_counter()
            assert sdvae.load_vae(folder).graphs is not None
            row["cached_load_s"] = time.perf_counter() - started
        rows.append(row)
        print(f"  {name}: {row}", flush=True)
    return rows


def onednn_codec(folder, z):
    """load_vae's codec with its decoder traced, frozen and optimised for inference by TorchScript."""
    import sdvae

    codec = sdvae.load_vae(folder, backend="pytorch")
    decoder = codec.model.decoder
    with torch.no_grad():
        example = codec.model.post_quant_conv(z.contiguous(memory_format=torch.channels_last))
        traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(decoder.eval(), example)))
    codec.model.decoder = traced
    return codec


def quality_rows(vae_path, data_dir, dtypes, device, max_images):
    """PSNR of each precision's reconstruction against the input and against the fp32 reconstruction (8-bit,
    full size), on real photos with a trained VAE."""
    import numpy as np

    import sdvae
    from sdvae.images import open_image
    from sdvae.inputs import list_images
    from sdvae.metrics import psnr

    files = list_images(Path(data_dir))[:max_images]
    images = [np.array(open_image(f)) for f in files]
    recon = {}
    for name in ["fp32"] + [d for d in dtypes if d != "fp32"]:
        codec = sdvae.load_vae(vae_path, device, DTYPES[name])
        start = time.perf_counter()
        recon[name] = [codec.decode(codec.encode(im), size=(im.shape[1], im.shape[0]), output_type="np")[0]
                       for im in images]
        recon[name + "_seconds"] = time.perf_counter() - start
    rows = []
    for name in [d for d in dtypes if d != "fp32"]:
        vs_input = [psnr(r, im) for r, im in zip(recon[name], images)]
        vs_fp32 = [psnr(r, f) for r, f in zip(recon[name], recon["fp32"])]
        base = [psnr(f, im) for f, im in zip(recon["fp32"], images)]
        rows.append(dict(dtype=name, images=len(images), psnr_fp32=float(np.mean(base)),
                         psnr=float(np.mean(vs_input)), psnr_change=float(np.mean(vs_input) - np.mean(base)),
                         psnr_vs_fp32_output=float(np.mean(vs_fp32)), seconds=recon[name + "_seconds"],
                         fp32_seconds=recon["fp32_seconds"]))
        print(f"quality {name}: PSNR {rows[-1]['psnr']:.3f} dB vs fp32 {rows[-1]['psnr_fp32']:.3f} "
              f"({rows[-1]['psnr_change']:+.3f}); against the fp32 output {rows[-1]['psnr_vs_fp32_output']:.2f} dB")
    return rows


def memory_child(folder, device, size, mode, tile_size, max_memory_gb):
    """Runs in its own process: one decode of a size x size image; prints a JSON line."""
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device)
    if mode.startswith("diffusers"):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(folder).to(device).eval()
        if mode == "diffusers tiled":
            vae.enable_tiling()
    else:
        import sdvae
        codec = sdvae.load_vae(folder, device, torch.float32, tile_size=tile_size,
                               max_memory=int(max_memory_gb * 1e9) if max_memory_gb else None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident size (VmHWM) to the current
        before = _status_kb("VmRSS") * 1024
    start = time.perf_counter()
    with torch.no_grad():
        if mode.startswith("diffusers"):
            vae.decode(z)
        else:
            codec.decode(z, scaled=False, tiled=mode == "ours tiled", output_type="pt")
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kb("VmHWM") * 1024
    print(json.dumps(dict(size=size, mode=mode, seconds=seconds, peak_extra_gb=(peak - before) / 1e9,
                          max_memory_gb=max_memory_gb)))


def _status_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def memory_rows(folder, device, sizes, modes, tile_size, untiled_up_to, max_memory_gb):
    rows = []
    for size in sizes:
        for mode in modes + (["diffusers untiled"] if size <= untiled_up_to else []):
            print(f"memory: {mode} decode at {size}x{size} ...", flush=True)
            result = subprocess.run([sys.executable, __file__, "--child", folder, device, str(size), mode,
                                     str(tile_size), str(max_memory_gb)], capture_output=True, text=True)
            if result.returncode:
                print(result.stderr[-2000:])
                rows.append(dict(size=size, mode=mode, error=result.stderr.strip().splitlines()[-1]))
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]['seconds']:.1f} s, peak +{rows[-1]['peak_extra_gb']:.2f} GB", flush=True)
    return rows


def markdown(rows, memory, meta, quality=()) -> str:
    lines = [f"# Inference benchmark: {meta['device']}", "",
             f"torch {meta['torch']}, diffusers {meta['diffusers']}; `{meta['command']}`", "",
             "ours = `sdvae.load_vae`'s default: on the CPU in fp32, onnxruntime on the ONNX graphs of the weights "
             "that it exports and caches (with the `onnx` extra); otherwise channels-last PyTorch. Tiled rows run "
             "PyTorch.", "",
             "| | size | batch | dtype | diffusers img/s | ours img/s | ours / diffusers | max abs diff | "
             "ours tiled img/s | tiled / diffusers | tiled max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tiled = (f"{r['ours tiled_img_s']:.3g} | {r['ours tiled_vs_diffusers']:.2f}x | {r['ours tiled_max_diff']:.1e}"
                 if "ours tiled_img_s" in r else "| |")
        lines.append(f"| {r['direction']} | {r['size']} | {r['batch']} | {r['dtype']} | {r['diffusers_img_s']:.3g} | "
                     f"{r['ours_img_s']:.3g} | {r['ours_vs_diffusers']:.2f}x | {r['ours_max_diff']:.1e} | {tiled} |")
        if "ours+compile_img_s" in r:
            lines.append(f"| {r['direction']} (compiled) | {r['size']} | {r['batch']} | {r['dtype']} | | "
                         f"{r['ours+compile_img_s']:.3g} | {r['ours+compile_vs_diffusers']:.2f}x | "
                         f"{r['ours+compile_max_diff']:.1e} | | | |")
    if quality:
        lines += ["", "Quality of the lower precisions (encode + decode at full size, 8-bit PSNR):", "",
                  "| dtype | images | PSNR fp32 | PSNR | change | PSNR against the fp32 output | seconds (fp32) |",
                  "|---|---|---|---|---|---|---|"]
        for q in quality:
            lines.append(f"| {q['dtype']} | {q['images']} | {q['psnr_fp32']:.3f} | {q['psnr']:.3f} | "
                         f"{q['psnr_change']:+.3f} | {q['psnr_vs_fp32_output']:.2f} | {q['seconds']:.0f} "
                         f"({q['fp32_seconds']:.0f}) |")
    if memory:
        lines += ["", "Decode memory (fp32, one image, fresh process each):", "",
                  "| size | mode | seconds | peak extra GB |", "|---|---|---|---|"]
        for m in memory:
            mode = m["mode"] + (f" (max_memory {m['max_memory_gb']:g} GB)" if m.get("max_memory_gb") else "")
            lines.append(f"| {m['size']} | {mode} | " + (f"{m['seconds']:.1f} | {m['peak_extra_gb']:.2f} |"
                                                         if "seconds" in m else f"failed: {m['error']} | |"))
    return "\n".join(lines) + "\n"


def main():
    if sys.argv[1:2] == ["--child"]:
        folder, device, size, mode, tile, max_memory_gb = sys.argv[2:]
        return memory_child(folder, device, int(size), mode, int(tile), float(max_memory_gb))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--batches", type=int, nargs="*", default=[1])
    parser.add_argument("--extra", nargs="*", default=["256x8"], help="more SIZExBATCH speed rows (fp32)")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd encoder/decoder")
    parser.add_argument("--tiled-from", type=int, default=1024, help="also time tiled mode from this size")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--untiled-up-to", type=int, default=1024, help="memory rows of the untiled decode too")
    parser.add_argument("--memory-modes", nargs="*", default=["ours tiled", "diffusers tiled"])
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--max-memory-gb", type=float, default=0,
                        help="ours tiled: activations held in memory before tiles spill to disk (0: 60%% of free)")
    parser.add_argument("--quality-vae", help="a trained VAE: PSNR change of bf16/fp16 against fp32 on --quality-data")
    parser.add_argument("--quality-data", default=str(Path(__file__).resolve().parents[2] / "shared/data/kodak"))
    parser.add_argument("--quality-dtypes", nargs="*", default=["bf16"])
    parser.add_argument("--quality-images", type=int, default=24)
    parser.add_argument("--budget-s", type=float, default=20.0, help="seconds of repeats per measurement")
    parser.add_argument("--out", default=None, help="results file stem (default eval/results/bench_inference_<device>)")
    parser.add_argument("--backends", type=int, metavar="SIZE",
                        help="only the CPU execution paths' fp32 encode/decode of SIZE x SIZE (eager, torch.compile, "
                             "oneDNN, onnxruntime); writes eval/results/bench_inference_backends_cpu.*")
    args = parser.parse_args()

    import diffusers

    from sdvae.models import build_vae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else \
        f"CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"
    folder = tempfile.mkdtemp(prefix="sdvae-bench-")
    os.environ.setdefault("SDVAE_CACHE_DIR", str(Path(folder) / "cache"))  # the default path's first export is timed
    torch.manual_seed(0)
    build_vae("sd-kl-f8").save_pretrained(folder)

    if args.backends:
        return write_backends(backend_rows(folder, args.backends, args.budget_s), name, diffusers.__version__)
    rows = speed_rows(folder, device, args.sizes, args.batches, args.dtypes, args.compile, args.budget_s,
                      args.tiled_from)
    for extra in args.extra:
        size, batch = map(int, extra.split("x"))
        rows += speed_rows(folder, device, [size], [batch], ["fp32"], False, args.budget_s, args.tiled_from)
    quality = quality_rows(args.quality_vae, args.quality_data, args.quality_dtypes, device, args.quality_images) \
        if args.quality_vae else []
    memory = memory_rows(folder, device, args.memory_sizes, args.memory_modes, args.tile_size, args.untiled_up_to,
                         args.max_memory_gb)

    meta = dict(device=name, torch=torch.__version__, diffusers=diffusers.__version__,
                command="python " + " ".join(sys.argv))
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_inference_{device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, speed=rows, memory=memory, quality=quality),
                                                   indent=2))
    table = markdown(rows, memory, meta, quality)
    out.with_suffix(".md").write_text(table)
    print(table)


def write_backends(rows, device_name, diffusers_version) -> None:
    import onnxruntime

    default = next(r for r in rows if "default" in r["path"])
    lines = [f"# Encode and decode through each CPU execution path: {device_name}", "",
             f"torch {torch.__version__}, diffusers {diffusers_version}, onnxruntime {onnxruntime.__version__}; "
             f"`python {' '.join(sys.argv)}`", "",
             "The SD VAE architecture (`sd-kl-f8`, random weights, seed 0), one image, fp32. Median seconds of the "
             "timed calls after a first call; the first load and call (compiling, tracing, the ONNX export) are "
             "given apart. Max abs diff: against diffusers' output, on [-1, 1] (decode) and on the unscaled "
             f"latent mean (encode). The default's later loads find its graphs cached: {default['cached_load_s']:.1f} "
             "s each (loading and hashing the weights, opening the sessions).", "",
             "| path | size | decode s | vs diffusers | encode s | vs diffusers | first load + call s | "
             "max abs diff (decode / encode) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setup = f"{r['setup_s']:.0f}" if "setup_s" in r else ""
        encode = f"{r['encode_s']:.2f} | {r['encode_vs_diffusers']:.2f}x" if "encode_s" in r else "| "
        diffs = f"{r['max_diff']:.1e}" + (f" / {r['encode_max_diff']:.1e}" if "encode_max_diff" in r else "")
        lines.append(f"| {r['path']} | {r['size']} | {r['seconds']:.2f} | {r['vs_diffusers']:.2f}x | {encode} | "
                     f"{setup} | {diffs} |")
    out = Path(__file__).parent / "results" / "bench_inference_backends_cpu"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
