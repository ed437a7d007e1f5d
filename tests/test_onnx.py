"""ONNX export (`sdvae export --format onnx`) and the onnxruntime backend, against PyTorch."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdvae.cli import main
from sdvae.codec import load_vae
from sdvae.models import build_student
from sdvae.files import FolderLock
from sdvae.models import build_vae
from sdvae.onnx import export_onnx
from sdvae.weights import decode_latents, encode_latents

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install -e '.[dev]')")


@pytest.mark.slow
def test_export_onnx_and_run_encode_decode_with_onnxruntime(tmp_path, photos, vae_dir, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(vae_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    graph = onnx.load(str(out / "vae_decoder" / "model.onnx"))
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert float(metadata["scaling_factor"]) == 0.18215
    assert json.loads(metadata["sdvae.config"])["_class_name"] == "AutoencoderKL"
    batch = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in batch] == ["batch", "", "height", "width"]  # dynamic batch and size

    # the same files through each backend; "auto" on the exported folder runs it with onnxruntime
    runs = {"pytorch": [vae_dir, "--backend", "pytorch"], "onnxruntime": [out, "--backend", "onnxruntime"],
            "auto-on-graphs": [out, "--backend", "auto"]}
    for name, (vae, *backend) in runs.items():
        assert main(["encode", str(photos), "--vae", str(vae), *backend, "--out", str(tmp_path / f"z-{name}")]) == 0
        assert main(["decode", str(tmp_path / f"z-{name}"), "--vae", str(vae), *backend,
                     "--out", str(tmp_path / f"x-{name}")]) == 0
    assert_same_outputs(tmp_path, list(runs))


def assert_same_outputs(folder, runs):
    """z-RUN and x-RUN in `folder` hold the same files for each run, equal to the first's within fp32 rounding."""
    names = sorted(p.name for p in (folder / f"z-{runs[0]}").glob("*.safetensors"))
    for run in runs[1:]:
        assert names and names == sorted(p.name for p in (folder / f"z-{run}").glob("*.safetensors"))
        for name in names:  # photos of several sizes and aspects: the graphs' axes are dynamic
            a, b = (load_file(folder / f"z-{k}" / name)["latent"] for k in (runs[0], run))
            assert (a - b).abs().max() <= 1e-4
            png = name.replace(".safetensors", ".png")
            x, y = (np.asarray(Image.open(folder / f"x-{k}" / png), np.int16) for k in (runs[0], run))
            assert x.shape == y.shape and np.abs(x - y).max() <= 1


@pytest.mark.slow
def test_the_default_cpu_path_exports_once_then_runs_cached_graphs(tmp_path, photos, vae_dir, monkeypatch,
                                                                    capsys):
    monkeypatch.delenv("SDVAE_BACKEND")  # load_vae's own default: auto
    monkeypatch.setenv("SDVAE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "onnx" / ".killed-export.tmp").mkdir(parents=True)  # what a kill midway leaves
    for name, backend in (("pytorch", ["--backend", "pytorch"]), ("default", []), ("cached", [])):
        assert main(["encode", str(photos), "--vae", str(vae_dir), *backend, "--out", str(tmp_path / f"z-{name}")]) == 0
        assert main(["decode", str(tmp_path / f"z-{name}"), "--vae", str(vae_dir), *backend,
                     "--out", str(tmp_path / f"x-{name}")]) == 0
        exports = capsys.readouterr().err.count("exporting this VAE to ONNX once")
        assert exports == {"pytorch": 0, "default": 1, "cached": 0}[name]  # the decode found the encode's graphs
    assert_same_outputs(tmp_path, ["pytorch", "default", "cached"])
    [cached] = [p for p in (tmp_path / "cache" / "onnx").iterdir() if p.name != ".sdvae.lock"]
    assert sorted(p.name for p in cached.iterdir()) == [".sdvae-output.json", "sdvae-onnx.json", "vae_decoder",
                                                         "vae_encoder"]

    codec, reference = load_vae(str(vae_dir)), load_vae(str(vae_dir), backend="pytorch")
    assert codec.graphs is not None and reference.graphs is None
    assert load_vae(str(vae_dir), dtype=torch.bfloat16).graphs is None  # 16-bit runs PyTorch
    calls = []
    run = codec.graphs._run
    monkeypatch.setattr(codec.graphs, "_run", lambda graph, x: calls.append(graph) or run(graph, x))
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    z = codec.encode(x, tiled=False)
    assert calls == ["encoder"]
    torch.testing.assert_close(z, reference.encode(x, tiled=False), rtol=0, atol=1e-4)
    tiled = codec.decode(z, tiled=True, tile_size=32, output_type="pt")  # tiles need PyTorch's blocks
    assert calls == ["encoder"]
    whole = codec.decode(z, tiled=False, output_type="pt")
    assert calls == ["encoder", "decoder"]
    torch.testing.assert_close(whole, reference.decode(z, tiled=False, output_type="pt"), rtol=0, atol=1e-4)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_the_default_path_stays_on_pytorch_where_graphs_are_not_exact_or_cannot_be_cached(tmp_path, vae_dir,
                                                                                         monkeypatch):
    import sdvae.onnx

    monkeypatch.delenv("SDVAE_BACKEND")
    monkeypatch.setenv("SDVAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: PyTorch, quietly
    assert load_vae(str(vae_dir)).graphs is None and not (tmp_path / "cache").exists()
    monkeypatch.undo()

    monkeypatch.delenv("SDVAE_BACKEND")
    monkeypatch.setenv("SDVAE_CACHE_DIR", str(tmp_path / "busy"))
    with FolderLock(tmp_path / "busy" / "onnx"), pytest.warns(UserWarning, match="in use by another sdvae"):
        assert load_vae(str(vae_dir)).graphs is None  # another process is exporting: PyTorch, this time
    assert load_vae(str(vae_dir)).graphs is not None  # and the next load exports

    monkeypatch.setenv("SDVAE_CACHE_DIR", str(tmp_path / "cache"))
    check_parity = sdvae.onnx.check_parity
    monkeypatch.setattr(sdvae.onnx, "check_parity", lambda vae, folder, bound: check_parity(vae, folder, 0.0))
    with pytest.warns(UserWarning, match="ONNX export failed.*differs from PyTorch"):
        codec = load_vae(str(vae_dir))
    assert codec.graphs is None
    [failed] = (tmp_path / "cache" / "onnx").glob("*.failed")  # remembered: the next load does not try again
    kept = {failed.name, ".sdvae.lock"}
    assert not [p for p in (tmp_path / "cache" / "onnx").iterdir() if p.name not in kept]
    monkeypatch.setattr(sdvae.onnx, "export_onnx", lambda *a, **k: pytest.fail("exported the same weights again"))
    assert load_vae(str(vae_dir)).graphs is None
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(codec.encode(x), load_vae(str(vae_dir), backend="pytorch").encode(x))

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SDVAE_CACHE_DIR", str(tmp_path / "file"))  # a cache that cannot be written
    with pytest.warns(UserWarning, match="could not be cached"):
        assert load_vae(str(vae_dir)).graphs is None
    with pytest.raises(ValueError, match="backend must be one of auto, pytorch, onnxruntime"):
        load_vae(str(vae_dir), backend="onnx")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-16ch", "student"])
def test_onnx_graphs_of_16_channel_vaes_and_students_match_pytorch(tmp_path, kind):
    torch.manual_seed(0)
    vae = build_student("taesd-16", build_vae("tiny")) if kind == "student" else build_vae("tiny-16ch")
    if kind == "tiny-16ch":
        vae.register_to_config(scaling_factor=0.8, shift_factor=0.1)
    parity = export_onnx(vae, tmp_path / "onnx")
    assert parity["encoder_max_abs_diff"] <= 1e-4 and parity["decoder_max_abs_diff"] <= 1e-4
    encoder, decoder = (onnx.load(str(tmp_path / "onnx" / part / "model.onnx")).graph
                        for part in ("vae_encoder", "vae_decoder"))
    latents = ["latent_sample"] if kind == "student" else ["latent_sample", "latent_logvar"]  # a student: no logvar
    assert [i.name for i in encoder.input] == ["sample"] and [o.name for o in encoder.output] == latents
    assert [i.name for i in decoder.input] == ["latent_sample"] and [o.name for o in decoder.output] == ["sample"]
    vae.save_pretrained(tmp_path / "vae")
    ours, theirs = load_vae(str(tmp_path / "onnx"), backend="onnxruntime"), load_vae(str(tmp_path / "vae"))
    x = torch.rand(3, 3, 40, 56) * 2 - 1
    z = theirs.encode(x)  # scaled: (z - shift) * scale, from the exported factors
    torch.testing.assert_close(ours.encode(x), z, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.decode(z, output_type="pt"), theirs.decode(z, output_type="pt"), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_failed_parity_check_writes_nothing_and_bad_folders_are_named(tmp_path, vae_dir, capsys):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_onnx(build_vae("tiny"), tmp_path / "onnx", bound=0.0)
    assert not (tmp_path / "onnx").exists()
    assert main(["encode", str(vae_dir), "--vae", str(vae_dir), "--backend", "onnxruntime", "--out",
                 str(tmp_path / "z")]) == 2
    assert "vae_encoder/model.onnx" in capsys.readouterr().err
    assert main(["export", str(vae_dir), "--format", "onnx", "--dtype", "fp16", "--out", str(tmp_path / "x")]) == 2
    assert "fp32" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_takes_the_backend_and_caches_refuse_graph_folders(tmp_path, photos, vae_dir, capsys):
    graphs = tmp_path / "onnx"
    assert main(["export", str(vae_dir), "--format", "onnx", "--out", str(graphs)]) == 0
    assert main(["eval", "--vae", f"weights={vae_dir}", "--vae", f"graphs={graphs}", "--backend", "auto",
                 "--data", str(photos), "--out", str(tmp_path / "eval"), "--resolution", "64", "--no-lpips",
                 "--no-fid"]) == 0
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())["vaes"]
    assert scores["graphs"]["psnr_mean"] == pytest.approx(scores["weights"]["psnr_mean"], abs=1e-3)
    capsys.readouterr()
    assert main(["cache-latents", "--vae", str(graphs), "--backend", "auto", "--data", str(photos), "--out",
                 str(tmp_path / "cache"), "--resolution", "64", "--num-workers", "0"]) == 2
    assert "needs the VAE's weights" in capsys.readouterr().err


# The layout of diffusers' and optimum's ONNX pipelines, old folders, and graph folders that are named when bad.

@pytest.fixture(scope="module")
def exported(tmp_path_factory, vae_dir):
    """vae_dir's VAE and its export, written once; tests change copies of the export."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    folder = tmp_path_factory.mktemp("exported") / "onnx"
    export_onnx(vae, folder)
    return vae, folder


def copy_export(exported, tmp_path):
    import shutil

    return shutil.copytree(exported[1], tmp_path / "graphs")


def export_legacy(vae, folder):
    """The layout sdvae wrote before diffusers' (format 1): encoder.onnx (`image` -> `latent_mean`,
    `latent_logvar`) and decoder.onnx (`latents` -> `image`), no manifest."""
    from sdvae.export import check_images
    from sdvae.weights import plain_config
    from sdvae.onnx import _Decoder, _Encoder, _export

    folder.mkdir(parents=True)
    metadata = {"sdvae.config": json.dumps({"_class_name": type(vae).__name__, **plain_config(vae)}),
                "scaling_factor": str(vae.config.scaling_factor), "shift_factor": "0.0"}
    images = check_images(64)
    _export(_Encoder(vae), images, folder / "encoder.onnx", "image", ["latent_mean", "latent_logvar"], metadata)
    _export(_Decoder(vae), vae.encode(images).latent_dist.mean, folder / "decoder.onnx", "latents", ["image"],
            metadata)


@pytest.mark.slow
def test_the_export_has_the_layout_and_names_that_diffusers_and_optimum_load(exported):
    import onnxruntime
    from diffusers import OnnxRuntimeModel

    vae, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [".sdvae-output.json", "sdvae-onnx.json", "vae_decoder",
                                                      "vae_encoder"]
    for part in ("vae_encoder", "vae_decoder"):
        metadata = {p.key: p.value for p in onnx.load(str(folder / part / "model.onnx")).metadata_props}
        assert json.loads(metadata["sdvae.config"])["_class_name"] == "AutoencoderKL"
        assert float(metadata["scaling_factor"]) == 0.18215 and float(metadata["shift_factor"]) == 0.0
    manifest = json.loads((folder / "sdvae-onnx.json").read_text())
    assert manifest["format"] == 2 and set(manifest["files"]) == {"vae_encoder/model.onnx", "vae_decoder/model.onnx"}

    x = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        image = vae.decode(posterior.mean).sample
    encoder = onnxruntime.InferenceSession(str(folder / "vae_encoder" / "model.onnx"))
    decoder = onnxruntime.InferenceSession(str(folder / "vae_decoder" / "model.onnx"))
    assert [o.name for o in encoder.get_outputs()] == ["latent_sample", "latent_logvar"]
    mean, logvar = encoder.run(None, {"sample": x.numpy()})
    [decoded] = decoder.run(["sample"], {"latent_sample": posterior.mean.numpy()})
    for got, want in ((mean, posterior.mean), (logvar, posterior.logvar), (decoded, image)):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-4)

    # what OnnxStableDiffusionPipeline calls: vae_encoder(sample=...)[0], vae_decoder(latent_sample=...)[0]
    # (diffusers 0.42 reads provider_options from a local folder's kwargs without a default: KeyError without it)
    vae_encoder = OnnxRuntimeModel.from_pretrained(folder / "vae_encoder", provider_options=None)
    vae_decoder = OnnxRuntimeModel.from_pretrained(folder / "vae_decoder", provider_options=None)
    torch.testing.assert_close(torch.from_numpy(vae_encoder(sample=x.numpy())[0]), posterior.mean, rtol=0, atol=1e-4)
    decoded = vae_decoder(latent_sample=posterior.mean.numpy().astype(np.float32))[0]
    torch.testing.assert_close(torch.from_numpy(decoded), image, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_folders_of_the_earlier_layout_still_load(tmp_path, exported):
    from sdvae.onnx import OnnxVAE, is_graph_folder

    vae, _ = exported
    export_legacy(vae, tmp_path / "old")
    assert is_graph_folder(tmp_path / "old")
    x = torch.rand(1, 3, 48, 32) * 2 - 1
    graphs = OnnxVAE(tmp_path / "old")
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        torch.testing.assert_close(encode_latents(graphs, x)[0], posterior.mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(decode_latents(graphs, posterior.mean), vae.decode(posterior.mean).sample, rtol=0,
                                   atol=1e-4)
    codec = load_vae(str(tmp_path / "old"), backend="auto")  # a graph folder: onnxruntime
    torch.testing.assert_close(codec.encode(x), load_vae(str(exported[1]), backend="auto").encode(x), rtol=0,
                               atol=1e-4)


@pytest.mark.slow
def test_export_onnx_replaces_only_folders_sdvae_wrote(tmp_path, exported):
    from sdvae.files import ForeignOutput

    vae, _ = exported
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ForeignOutput, match="mine.*add --overwrite"):
        export_onnx(vae, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    folder = copy_export(exported, tmp_path)
    (folder / "vae_decoder" / "model.onnx").write_bytes(b"")
    export_onnx(vae, folder)  # an earlier export is ours: replaced, whole
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in exported[1].iterdir())
    assert (folder / "vae_decoder" / "model.onnx").stat().st_size > 0


def set_metadata(path, key, value):
    model = onnx.load(str(path))
    [entry] = [p for p in model.metadata_props if p.key == key]
    entry.value = value
    onnx.save(model, str(path))


@pytest.mark.parametrize("part", ["vae_encoder", "vae_decoder"])
@pytest.mark.parametrize("value, message", [("{not json", "is not JSON"), ("[1, 2]", "not a VAE's config"),
                                            ('"AutoencoderKL"', "not a VAE's config"),
                                            ('{"_class_name": "AutoencoderKL"}', "latent_channels"),
                                            ('{"_class_name": "AutoencoderKL", "latent_channels": 4, '
                                             '"scaling_factor": "big"}', "scaling_factor")])
def test_metadata_that_is_not_a_config_names_the_graph(tmp_path, exported, part, value, message):
    from sdvae.onnx import OnnxVAE

    folder = copy_export(exported, tmp_path)
    set_metadata(folder / part / "model.onnx", "sdvae.config", value)
    with pytest.raises(ValueError, match=f"{part}/model.onnx.*{message}"):
        OnnxVAE(folder)


def test_graphs_of_two_vaes_in_one_folder_are_refused(tmp_path, exported):
    from sdvae.onnx import OnnxVAE

    folder = copy_export(exported, tmp_path)
    config = json.loads({p.key: p.value for p in onnx.load(str(folder / "vae_encoder" / "model.onnx"))
                         .metadata_props}["sdvae.config"])
    set_metadata(folder / "vae_encoder" / "model.onnx", "sdvae.config", json.dumps(config | {"scaling_factor": 0.5}))
    with pytest.raises(ValueError, match="graphs of different VAEs"):
        OnnxVAE(folder)
    (folder / "vae_encoder" / "model.onnx").replace(folder / "swapped.onnx")  # the decoder as the encoder
    (folder / "vae_decoder" / "model.onnx").rename(folder / "vae_encoder" / "model.onnx")
    (folder / "swapped.onnx").rename(folder / "vae_decoder" / "model.onnx")
    with pytest.raises(ValueError, match="vae_encoder/model.onnx is not this VAE's encoder graph"):
        OnnxVAE(folder)


@pytest.mark.parametrize("layout", ["diffusers", "legacy"])
def test_a_folder_with_one_graph_names_the_folder_and_the_missing_graph(tmp_path, exported, capsys, layout):
    import shutil

    from sdvae.onnx import OnnxVAE

    if layout == "diffusers":
        folder, missing = copy_export(exported, tmp_path), "vae_decoder/model.onnx"
        shutil.rmtree(folder / "vae_decoder")
    else:
        folder, missing = tmp_path / "old", "decoder.onnx"
        export_legacy(exported[0], folder)
        (folder / "decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder} has no {missing}"):
        OnnxVAE(folder)
    x = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(x)
    for backend in ("auto", "onnxruntime"):  # auto: a folder of graphs, not a diffusers folder, is named as such
        assert main(["encode", str(x), "--vae", str(folder), "--backend", backend, "--out", str(tmp_path / "z")]) == 2
        err = capsys.readouterr().err
        assert f"{folder} has no {missing}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "truncated-at-a-field"])
def test_a_graph_onnxruntime_cannot_parse_is_a_value_error_naming_it(tmp_path, exported, damage):
    from sdvae.onnx import OnnxVAE

    folder = copy_export(exported, tmp_path)
    path = folder / "vae_decoder" / "model.onnx"
    data = path.read_bytes()
    if damage == "truncated-at-a-field":  # parses, with the graph cut short: onnxruntime's error, not protobuf's
        model = onnx.load_model_from_string(data)
        del model.graph.initializer[:]
        data = model.SerializeToString()
    else:
        data = {"truncated": data[: len(data) // 2], "garbage": np.random.default_rng(0).bytes(len(data)),
                "empty": b""}[damage]
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"{path} is not an ONNX graph"):
        OnnxVAE(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_graphs_with_non_finite_weights_are_refused(tmp_path, exported, value):
    from onnx import numpy_helper

    from sdvae.onnx import OnnxVAE

    folder = copy_export(exported, tmp_path)
    path = folder / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and "conv" in t.name)
    array = numpy_helper.to_array(tensor).copy()
    array.flat[3] = value
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match=f"{path}: its weight {tensor.name} holds non-finite values"):
        OnnxVAE(folder)
