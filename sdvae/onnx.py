"""ONNX: a VAE's encoder and decoder as two graphs (dynamic batch and size), checked against PyTorch when they
are written, and run by onnxruntime behind the calls the codec makes (`load_vae(..., backend="onnxruntime")`).

    sdvae export runs/my-vae --format onnx --out my-vae-onnx     # encoder.onnx, decoder.onnx

`load_vae`'s default CPU path (fp32, backend "auto") runs these graphs too: the first load of a VAE exports them
into a cache keyed by its weights (`cached_graphs`), where they pass the parity check, and later loads reuse them.
At 512x512 onnxruntime decodes 1.17x and encodes 1.25x as fast as our PyTorch path on the CPU (1.37x and 1.42x
diffusers' eager; eval/results/bench_inference_backends_cpu.md).

encoder.onnx: `image` (B, 3, H, W) in [-1, 1] -> `latent_mean`, `latent_logvar` (a KL VAE, unscaled) or `latents`
(a tiny student). decoder.onnx: `latents` (unscaled) -> `image`. Both carry the VAE's config in their metadata
(`sdvae.config`, and `scaling_factor` / `shift_factor` on their own for other readers).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from .models import is_tiny

PARITY_BOUND = 1e-4  # max abs difference from PyTorch in fp32, on the image and the latent scale alike
OPSET = 18
GRAPHS = ("encoder.onnx", "decoder.onnx")


class _Encoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        if is_tiny(self.vae):
            return self.vae.encoder(image)
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean, posterior.logvar


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


def export_onnx(vae, folder: str | Path, bound: float = PARITY_BOUND) -> dict:
    """Write encoder.onnx and decoder.onnx into `folder` (whole or not at all), after checking both against the
    PyTorch model with onnxruntime at two batch sizes and image sizes; returns the differences measured."""
    from .export import assert_finite, check_images, plain_config
    from .files import atomic_folder

    if Path(folder).is_file():
        raise FileExistsError(f"{folder} is a file; the ONNX export is a folder")
    vae = vae.float().eval()
    assert_finite(vae.state_dict(), f"the VAE for {folder}")
    tiny = is_tiny(vae)
    metadata = {"sdvae.config": json.dumps({"_class_name": type(vae).__name__, **plain_config(vae)}),
                "scaling_factor": str(vae.config.scaling_factor),
                "shift_factor": str(vae.config.get("shift_factor") or 0.0)}
    images = check_images(64)
    with torch.no_grad():
        latents = _Encoder(vae)(images)
    latents = latents if tiny else latents[0]
    encoder_outputs = ["latents"] if tiny else ["latent_mean", "latent_logvar"]
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:
        _export(_Encoder(vae), images, tmp / "encoder.onnx", "image", encoder_outputs, metadata)
        _export(_Decoder(vae), latents, tmp / "decoder.onnx", "latents", ["image"], metadata)
        parity = check_parity(vae, tmp, bound)
    return parity


def _export(module, example, path: Path, input_name: str, output_names: list, metadata: dict) -> None:
    import onnx

    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=output_names,
                          dynamic_axes={name: axes for name in [input_name, *output_names]}, opset_version=OPSET,
                          dynamo=False)
    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


@torch.no_grad()
def check_parity(vae, folder: Path, bound: float = PARITY_BOUND) -> dict:
    """Max abs differences of the graphs in `folder` from `vae`, on two real photos at 64 px and one 48x80 crop
    (another batch size and aspect than the export's); ValueError when one is over `bound` or not finite."""
    from .export import check_images

    graphs = OnnxVAE(folder)
    measured = {"encoder": 0.0, "decoder": 0.0}
    for x in (check_images(64), check_images(80)[:1, :, 16:64, :]):
        got, want = (graphs.encode(x), vae.encode(x))
        got, want = ([e.latents] if is_tiny(vae) else [e.latent_dist.mean, e.latent_dist.logvar] for e in (got, want))
        measured["encoder"] = max(measured["encoder"], *map(max_abs_diff, got, want))
        decoded = max_abs_diff(graphs.decode(want[0]).sample, vae.decode(want[0]).sample)
        measured["decoder"] = max(measured["decoder"], decoded)
    for part, difference in measured.items():
        if not difference <= bound:
            raise ValueError(f"the ONNX {part} differs from PyTorch by {difference:.3g} (bound {bound:g}); nothing "
                             f"written")
    return {f"{part}_max_abs_diff": v for part, v in measured.items()} | {"bound": bound}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().nan_to_num(float("inf")).max())


def cache_dir() -> Path:
    """SDVAE_CACHE_DIR, else $XDG_CACHE_HOME/sdvae, else ~/.cache/sdvae."""
    if os.environ.get("SDVAE_CACHE_DIR"):
        return Path(os.environ["SDVAE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdvae"


def weights_key(vae) -> str:
    """A digest of the VAE's class, config and weights, and of the exporter: equal keys, equal graphs."""
    digest = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    digest.update(json.dumps([type(vae).__name__, config, torch.__version__, OPSET], default=str).encode())
    for name, tensor in vae.state_dict().items():
        tensor = tensor.detach().float().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def cached_graphs(vae) -> Path | None:
    """The folder of this VAE's graphs in the cache, exported and checked on first use (a one-time cost: 9 s for
    the SD VAE on 2 cores). None where there are none to run, and the caller stays on PyTorch: onnx/onnxruntime
    are not installed, the exporter fails, or the graphs differ from PyTorch by more than PARITY_BOUND (both
    remembered, so that later loads do not try again), the cache cannot be written, or another process is
    exporting into it."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from .files import FolderLock, FolderLocked, atomic_write, describe_error, remove_stale_temporaries

    root = cache_dir() / "onnx"
    key = weights_key(vae)
    folder, failed = root / key, root / f"{key}.failed"
    if is_graph_folder(folder):
        return folder
    if failed.is_file():
        return None
    try:
        with FolderLock(root, "ONNX export"):
            remove_stale_temporaries(root)  # what an export killed midway left
            if not is_graph_folder(folder):  # another process may have written them while we waited
                print(f"sdvae: exporting this VAE to ONNX once, for the faster CPU path, into {folder} "
                      f"(--backend pytorch skips it)", file=sys.stderr)
                export_onnx(vae, folder)
    except (OSError, FolderLocked) as e:  # a full disk, a read-only cache, a busy one: try again next time
        warnings.warn(f"running PyTorch: the ONNX graphs could not be cached in {root} ({describe_error(e)})")
        return None
    except Exception as e:  # the exporter or the parity check: the same weights would fail again
        atomic_write(failed, f"{describe_error(e)}\n")
        warnings.warn(f"running PyTorch: this VAE's ONNX export failed ({describe_error(e)}; see {failed})")
        return None
    return folder


def is_graph_folder(path) -> bool:
    return Path(path).is_dir() and all((Path(path) / name).is_file() for name in GRAPHS)


class OnnxVAE:
    """encoder.onnx and decoder.onnx, run by onnxruntime on the CPU, behind the calls VAECodec makes:
    encode(x).latent_dist (or .latents for a tiny student) and decode(z).sample, with the exported config."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("the onnxruntime backend needs onnxruntime: pip install 'sdvae[onnx]'") from None
        from diffusers.configuration_utils import FrozenDict

        folder = Path(folder)
        missing = [name for name in GRAPHS if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} has no {' / '.join(missing)}: the onnxruntime backend takes a folder "
                                    f"written by `sdvae export --format onnx`")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {name: onnxruntime.InferenceSession(str(folder / name), options,
                                                            providers=["CPUExecutionProvider"]) for name in GRAPHS}
        metadata = self.sessions["decoder.onnx"].get_modelmeta().custom_metadata_map
        if "sdvae.config" not in metadata:
            raise ValueError(f"{folder / 'decoder.onnx'} was not written by sdvae (no sdvae.config metadata)")
        config = json.loads(metadata["sdvae.config"])
        self.is_tiny = config["_class_name"] == "AutoencoderTiny"
        self.config = FrozenDict(config)

    def _run(self, graph: str, x: torch.Tensor) -> list:
        session = self.sessions[graph]
        feed = {session.get_inputs()[0].name: x.detach().float().contiguous().cpu().numpy()}
        return [torch.from_numpy(a) for a in session.run(None, feed)]

    def encode(self, x: torch.Tensor):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        outputs = self._run("encoder.onnx", x)
        if self.is_tiny:
            return AutoencoderTinyOutput(latents=outputs[0])
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat(outputs, dim=1)))

    def decode(self, z: torch.Tensor):
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=self._run("decoder.onnx", z)[0])

    def eval(self):
        return self

    def to(self, *args, **kwargs):  # onnxruntime holds the weights; fp32 on the CPU
        return self
