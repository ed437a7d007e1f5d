"""ONNX: a VAE's encoder and decoder as two graphs (dynamic batch and size), checked against PyTorch when they
are written, and run by onnxruntime behind the calls the codec makes (`load_vae(..., backend="onnxruntime")`).

    sdvae export runs/my-vae --format onnx --out my-vae-onnx     # vae_encoder/model.onnx, vae_decoder/model.onnx

The folder has the layout of the VAE in diffusers' ONNX pipelines (OnnxStableDiffusionPipeline and its img2img /
inpaint siblings) and optimum's ORTStableDiffusionPipeline, with their tensor names:
vae_encoder/model.onnx: `sample` (B, 3, H, W) in [-1, 1] -> `latent_sample` (the posterior mean, unscaled) and,
for a KL VAE, `latent_logvar`; a tiny student (AutoencoderTiny) has `latent_sample` only.
vae_decoder/model.onnx: `latent_sample` (unscaled) -> `sample`. Both carry the VAE's config in their metadata
(`sdvae.config`, and `scaling_factor` / `shift_factor` on their own for other readers), and sdvae-onnx.json lists
the sizes and sha256 of both. Folders of the earlier layout (encoder.onnx: `image` -> `latent_mean`,
`latent_logvar` or `latents`; decoder.onnx: `latents` -> `image`) still load.

`load_vae`'s default CPU path (fp32, backend "auto") runs these graphs too: the first load of a VAE exports them
into a cache keyed by its weights and by this exporter (`cached_graphs`), where they pass the parity check, and
later loads reuse them once their sizes and checksums match the manifest written with them; an entry that does
not is exported again. At 512x512 onnxruntime decodes 1.17x and encodes 1.25x as fast as our PyTorch path on the
CPU (1.37x and 1.42x diffusers' eager; eval/results/bench_inference_backends_cpu.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from diffusers.configuration_utils import FrozenDict

from .export import check_images
from .files import (FolderLock, FolderLocked, atomic_json, atomic_write, describe_error, output_folder, printable,
                    remove_stale_temporaries, remove_tree)
from .weights import (GraphVAE, assert_finite, check_config, decode_latents, encode_latents, is_tiny, plain_config,
                      vae_class)

PARITY_BOUND = 1e-4  # max abs difference from PyTorch in fp32, on the image and the latent scale alike
OPSET = 18
FORMAT_VERSION = 2  # 1: encoder.onnx / decoder.onnx without a manifest; 2: diffusers' layout, sdvae-onnx.json
ENCODER, DECODER = "vae_encoder/model.onnx", "vae_decoder/model.onnx"
LAYOUTS = ({"encoder": ENCODER, "decoder": DECODER},  # what export_onnx writes
           {"encoder": "encoder.onnx", "decoder": "decoder.onnx"})  # format 1, still loaded
MANIFEST = "sdvae-onnx.json"
# A changed exporter must never reuse graphs the old one wrote: its source is part of every cache key.
EXPORTER = hashlib.sha256(f"{FORMAT_VERSION}\n".encode() + Path(__file__).read_bytes()).hexdigest()[:16]

# Graph folders checked when they were written or found in the cache: folder -> the (size, mtime, inode) of their
# files then. OnnxVAE skips the scan for non-finite weights on these while the files are unchanged.
_verified: dict[str, tuple] = {}


class _Encoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        mean, logvar = encode_latents(self.vae, image)
        return mean if logvar is None else (mean, logvar)


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return decode_latents(self.vae, latents)


def export_onnx(vae, folder: str | Path, bound: float = PARITY_BOUND, *, overwrite: bool = False) -> dict:
    """Write vae_encoder/model.onnx, vae_decoder/model.onnx and their manifest into `folder` (whole or not at
    all), after checking both graphs against the PyTorch model with onnxruntime at two batch sizes and image
    sizes; returns the differences measured. A folder that sdvae did not write is replaced only with `overwrite`."""
    if Path(folder).is_file():
        raise FileExistsError(f"{printable(folder)} is a file; the ONNX export is a folder")
    vae = vae.float().eval()
    assert_finite(vae.state_dict(), f"the VAE for {printable(folder)}")
    tiny = is_tiny(vae)
    metadata = {"sdvae.config": json.dumps({"_class_name": type(vae).__name__, **plain_config(vae)}),
                "scaling_factor": str(vae.config.scaling_factor),
                "shift_factor": str(vae.config.get("shift_factor") or 0.0)}
    images = check_images(64)
    with torch.no_grad():
        latents = _Encoder(vae)(images)
    latents = latents if tiny else latents[0]
    encoder_outputs = ["latent_sample"] if tiny else ["latent_sample", "latent_logvar"]
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    with output_folder(folder, "export --format onnx", overwrite) as tmp:
        _export(_Encoder(vae), images, tmp / ENCODER, "sample", encoder_outputs, metadata)
        _export(_Decoder(vae), latents, tmp / DECODER, "latent_sample", ["sample"], metadata)
        write_manifest(tmp, weights_key(vae))
        _remember_verified(tmp)  # exported from weights checked finite above: no need to scan them again
        parity = check_parity(vae, tmp, bound)
    _remember_verified(Path(folder))
    return parity


def _export(module, example, path: Path, input_name: str, output_names: list, metadata: dict) -> None:
    import onnx

    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()  # written by us, not by torch's C++ writer: any file name works
    with warnings.catch_warnings(), torch.no_grad():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, input_names=[input_name], output_names=output_names,
                          dynamic_axes={name: axes for name in [input_name, *output_names]}, opset_version=OPSET,
                          dynamo=False)
    model = onnx.load_model_from_string(buffer.getvalue())
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


@torch.no_grad()
def check_parity(vae, folder: Path, bound: float = PARITY_BOUND) -> dict:
    """Max abs differences of the graphs in `folder` from `vae`, on two real photos at 64 px and one 48x80 crop
    (another batch size and aspect than the export's); ValueError when one is over `bound` or not finite."""
    graphs = OnnxVAE(folder)
    measured = {"encoder": 0.0, "decoder": 0.0}
    for x in (check_images(64), check_images(80)[:1, :, 16:64, :]):
        got, want = ([t for t in encode_latents(model, x) if t is not None] for model in (graphs, vae))
        measured["encoder"] = max(measured["encoder"], *map(max_abs_diff, got, want))
        decoded = max_abs_diff(decode_latents(graphs, want[0]), decode_latents(vae, want[0]))
        measured["decoder"] = max(measured["decoder"], decoded)
    for part, difference in measured.items():
        if not difference <= bound:
            raise ValueError(f"the ONNX {part} differs from PyTorch by {difference:.3g} (bound {bound:g}); nothing "
                             f"written")
    return {f"{part}_max_abs_diff": v for part, v in measured.items()} | {"bound": bound}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().nan_to_num(float("inf")).max())


# The manifest: which graphs a folder holds, for which weights and exporter, and their checksums.

def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, in parallel: hashlib and file reads release the GIL, so two graphs take the time of
    the larger one (about 0.14 s for the SD VAE's 330 MB on 2 cores)."""
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        return list(pool.map(file_sha256, paths))


def write_manifest(folder: Path, key: str) -> None:
    paths = [folder / ENCODER, folder / DECODER]
    files = {name: {"size": path.stat().st_size, "sha256": digest}
             for name, path, digest in zip((ENCODER, DECODER), paths, hash_files(paths))}
    atomic_json(folder / MANIFEST, {"format": FORMAT_VERSION, "key": key, "files": files})


def manifest_problem(folder: Path, key: str) -> str | None:
    """None when `folder` holds the graphs its manifest lists, made for `key` by this format; else what is wrong,
    in a few words."""
    if not folder.is_dir():
        return "not a folder"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, RecursionError) as e:
        return f"{MANIFEST} cannot be read ({describe_error(e)})"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} holds a JSON {type(manifest).__name__}, not a manifest"
    if manifest.get("format") != FORMAT_VERSION:
        return f"format {manifest.get('format')!r} in {MANIFEST}, not {FORMAT_VERSION}"
    if manifest.get("key") != key:
        return "its graphs were made for another VAE or exporter"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {ENCODER, DECODER} or \
            not all(isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values()):
        return f"{MANIFEST} does not list {ENCODER} and {DECODER} with their sizes and checksums"
    return files_problem(folder, files)


def files_problem(folder: Path, files: dict) -> str | None:
    for name, record in files.items():  # sizes first: a truncated file costs no hashing
        try:
            size = (folder / name).stat().st_size
        except OSError as e:
            return f"{name}: {describe_error(e)}"
        if size != record["size"]:
            return f"{name} is {size} bytes, not {record['size']}"
    names = list(files)
    try:
        digests = hash_files([folder / name for name in names])
    except OSError as e:
        return f"the graphs cannot be read ({describe_error(e)})"
    for name, digest in zip(names, digests):
        if digest != files[name]["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _signature(folder: Path) -> tuple:
    stats = [(folder / name).stat() for name in (ENCODER, DECODER)]
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def _remember_verified(folder: Path) -> None:
    _verified[str(folder.absolute())] = _signature(folder)


def _is_verified(folder: Path) -> bool:
    try:
        return _verified.get(str(folder.absolute())) == _signature(folder)
    except OSError:
        return False


# The cache of the default CPU path.

def cache_dir() -> Path:
    """SDVAE_CACHE_DIR, else $XDG_CACHE_HOME/sdvae, else ~/.cache/sdvae."""
    if os.environ.get("SDVAE_CACHE_DIR"):
        return Path(os.environ["SDVAE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdvae"


def weights_key(vae) -> str:
    """A digest of the VAE's class, config and weights, and of the exporter: equal keys, equal graphs."""
    digest = hashlib.sha256()  # sha256 runs on the CPU's SHA extensions: twice blake2b's speed here
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    digest.update(json.dumps([type(vae).__name__, config, torch.__version__, OPSET, EXPORTER], default=str).encode())
    for name, tensor in vae.state_dict().items():
        tensor = tensor.detach().float().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:32]


def cached_graphs(vae) -> Path | None:
    """The folder of this VAE's graphs in the cache, exported and checked on first use (a one-time cost: 9 s for
    the SD VAE on 2 cores), and on every later use checked against its manifest (sizes and sha256, 0.14 s for
    the SD VAE); an entry that fails (truncated, overwritten, another VAE's, an older format) is exported again,
    with one line on stderr. None where there are none to run, and the caller stays on PyTorch: onnx/onnxruntime
    are not installed, the exporter fails, or the graphs differ from PyTorch by more than PARITY_BOUND (both
    remembered, so that later loads do not try again), the cache cannot be written, or another process is
    exporting into it."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    root = cache_dir() / "onnx"
    key = weights_key(vae)
    folder, failed = root / key, root / f"{key}.failed"
    problem = entry_problem(folder, key)
    if problem is None:
        return folder
    if failed.is_file():
        return None
    try:
        with FolderLock(root, "ONNX export"):
            remove_stale_temporaries(root)  # what an export killed midway left
            problem = entry_problem(folder, key)  # another process may have written them since
            if problem is None:
                return folder
            if folder.exists() or folder.is_symlink():
                print(f"sdvae: the cached ONNX graphs in {printable(folder)} are unusable ({problem}); exporting "
                      f"them again", file=sys.stderr)
                # first: an export that fails leaves no bad entry behind (a link is removed, not what it points to)
                folder.unlink() if folder.is_symlink() else remove_tree(folder)
            else:
                print(f"sdvae: exporting this VAE to ONNX once, for the faster CPU path, into {printable(folder)} "
                      f"(--backend pytorch skips it)", file=sys.stderr)
            export_onnx(vae, folder, overwrite=True)  # the cache is sdvae's own folder
    except (OSError, FolderLocked) as e:  # a full disk, a read-only cache, a busy one: try again next time
        bad = f"; {printable(folder)} is unusable ({problem})" if folder.exists() else ""
        warnings.warn(f"running PyTorch: the ONNX graphs could not be cached in {printable(root)} "
                      f"({describe_error(e)}){bad}")
        return None
    except Exception as e:  # the exporter or the parity check: the same weights would fail again
        atomic_write(failed, f"{describe_error(e)}\n")
        warnings.warn(f"running PyTorch: this VAE's ONNX export failed ({describe_error(e)}; see {failed})")
        return None
    return folder


def entry_problem(folder: Path, key: str) -> str | None:
    """None when the cache entry `folder` is there and verified (and remembered as such); else why not."""
    if not (folder.exists() or folder.is_symlink()):
        return "missing"
    problem = manifest_problem(folder, key)
    if problem is None:
        _remember_verified(folder)
    return problem


# Loading a folder of graphs.

def is_graph_folder(path) -> bool:
    """A folder of exported graphs (either layout): both, or some of them and no diffusers config beside them, so
    that loading it names the graph that is missing."""
    path = Path(path)
    if not path.is_dir():
        return False
    present = [(path / name).is_file() for layout in LAYOUTS for name in layout.values()]
    return all(present[:2]) or all(present[2:]) or (any(present) and not (path / "config.json").is_file())


def graph_files(folder: Path) -> dict:
    """{"encoder": path, "decoder": path} in the layout `folder` has; FileNotFoundError naming what is missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{printable(folder)} is not a folder: the onnxruntime backend takes a folder "
                                f"written by `sdvae export --format onnx`")
    for layout in LAYOUTS:  # a whole layout first, then the one that is partly there
        if all((folder / name).is_file() for name in layout.values()):
            return {part: folder / name for part, name in layout.items()}
    for layout in LAYOUTS:
        missing = [name for name in layout.values() if not (folder / name).is_file()]
        if len(missing) < len(layout):
            raise FileNotFoundError(f"{printable(folder)} has no {missing[0]} (it has the other graph): export the "
                                    f"VAE again with `sdvae export --format onnx`")
    raise FileNotFoundError(f"{printable(folder)} has no {ENCODER} and {DECODER} (nor encoder.onnx and "
                            f"decoder.onnx): the onnxruntime backend takes a folder written by `sdvae export "
                            f"--format onnx`")


def check_finite_weights(path: Path) -> None:
    """ValueError naming `path` when its graph cannot be parsed or holds NaN or inf in its weights (initializers
    and constants): it would decode to black or NaN images. 0.2 s for the SD VAE's 330 MB of graphs."""
    import onnx
    from onnx import numpy_helper

    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError, whatever the installed protobuf runtime calls it
        raise ValueError(f"{printable(path)} is not an ONNX graph that can be read ({describe_error(e)})") from None
    constants = [a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute
                 if a.type == onnx.AttributeProto.TENSOR]
    for tensor in [*model.graph.initializer, *constants]:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"{printable(path)} keeps its weights in external files, which the onnxruntime "
                             f"backend does not read; export the VAE with `sdvae export --format onnx`")
        try:
            array = numpy_helper.to_array(tensor)
        except Exception as e:  # its bytes do not fill its shape, an unknown type: onnx's and numpy's errors
            raise ValueError(f"{printable(path)}: its weight {tensor.name or '(a constant)'} cannot be read "
                             f"({describe_error(e)})") from None
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"{printable(path)}: its weight {tensor.name or '(a constant)'} holds non-finite "
                             f"values (NaN or inf); export the VAE again from finite weights")


def open_session(path: Path, options):
    """An onnxruntime session of the graph in `path`; ValueError naming `path` when onnxruntime cannot load it."""
    import onnxruntime

    source = str(path)  # the path, not the bytes: onnxruntime maps the file, 20% faster
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8, which onnxruntime cannot open: its bytes instead
        source = path.read_bytes()
    try:
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise
    except Exception as e:  # onnxruntime's own types (InvalidProtobuf, InvalidGraph, Fail...) derive from Exception
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"{printable(path)} is not an ONNX graph onnxruntime can load ({reason})") from None


def graph_config(session, path: Path) -> dict:
    """The VAE config in a graph's `sdvae.config` metadata; ValueError naming `path` when it is absent, not JSON,
    or not a VAE's config."""
    metadata = session.get_modelmeta().custom_metadata_map
    if "sdvae.config" not in metadata:
        raise ValueError(f"{printable(path)} was not written by sdvae (no sdvae.config metadata)")
    try:
        config = json.loads(metadata["sdvae.config"])
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        raise ValueError(f"{printable(path)}: its sdvae.config metadata is not JSON") from None
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str) or "latent_channels" not in config:
        raise ValueError(f"{printable(path)}: its sdvae.config metadata is not a VAE's config (a JSON object with "
                         f"_class_name and latent_channels)")
    return check_config(config, f"{printable(path)} (sdvae.config metadata)")


def check_signature(session, part: str, config: dict, path: Path) -> None:
    """The graph takes one (B, C, H, W) input with the channels its part takes and gives the outputs the codec
    reads: a swapped or foreign graph is named here, not met as a shape error mid-encode."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    channels = config.get("in_channels", 3) if part == "encoder" else config["latent_channels"]
    wanted_outputs = 1 if part == "decoder" or config["_class_name"] == "AutoencoderTiny" else 2
    shape = inputs[0].shape if len(inputs) == 1 else []
    if len(shape) != 4 or shape[1] != channels or len(outputs) != wanted_outputs:
        found = f"inputs {[(i.name, i.shape) for i in inputs]}, {len(outputs)} outputs"
        raise ValueError(f"{printable(path)} is not this VAE's {part} graph ({found}; expected one input with "
                         f"{channels} channels and {wanted_outputs} outputs)")


class OnnxVAE(GraphVAE):
    """vae_encoder/model.onnx and vae_decoder/model.onnx (or the earlier encoder.onnx and decoder.onnx), run by
    onnxruntime on the CPU behind the interface every kind of VAE has (sdvae.weights: encode_latents,
    decode_latents, latents_are_posterior), with the exported config. Graphs that sdvae did not just write or verify in its
    cache are scanned for non-finite weights first; a graph that cannot be loaded is a ValueError naming it."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("the onnxruntime backend needs onnxruntime: pip install 'sdvae[onnx]'") from None

        folder = Path(folder)
        paths = graph_files(folder)
        verified = _is_verified(folder) and paths["encoder"] == folder / ENCODER
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions, configs = {}, {}
        for part, path in paths.items():
            if not verified:  # the cache's graphs were checked by their sha256, and exported from finite weights
                check_finite_weights(path)
            self.sessions[part] = open_session(path, options)
            configs[part] = graph_config(self.sessions[part], path)
            check_signature(self.sessions[part], part, configs[part], path)
        if configs["encoder"] != configs["decoder"]:
            raise ValueError(f"{printable(folder)}: {paths['encoder'].relative_to(folder)} and "
                             f"{paths['decoder'].relative_to(folder)} are graphs of different VAEs (their "
                             f"sdvae.config metadata differ)")
        self.latents_are_posterior = vae_class(configs["decoder"]) is not AutoencoderTiny
        self.config = FrozenDict(configs["decoder"])

    def _run(self, graph: str, x: torch.Tensor) -> list:
        session = self.sessions[graph]
        feed = {session.get_inputs()[0].name: x.detach().float().contiguous().cpu().numpy()}
        return [torch.from_numpy(a) for a in session.run(None, feed)]

    def encode_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = self._run("encoder", x)
        return (outputs[0], outputs[1]) if self.latents_are_posterior else (outputs[0], None)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self._run("decoder", z)[0]

    def eval(self):
        return self

    def to(self, *args, **kwargs):  # onnxruntime holds the weights; fp32 on the CPU
        return self
