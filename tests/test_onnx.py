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
from sdvae.distill import build_student
from sdvae.files import FolderLock
from sdvae.models import build_vae
from sdvae.onnx import export_onnx

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install -e '.[dev]')")


def test_export_onnx_and_run_encode_decode_with_onnxruntime(tmp_path, photos, vae_dir, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(vae_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    graph = onnx.load(str(out / "decoder.onnx"))
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
    assert sorted(p.name for p in cached.iterdir()) == ["decoder.onnx", "encoder.onnx"]

    codec, reference = load_vae(str(vae_dir)), load_vae(str(vae_dir), backend="pytorch")
    assert codec.graphs is not None and reference.graphs is None
    assert load_vae(str(vae_dir), dtype=torch.bfloat16).graphs is None  # 16-bit runs PyTorch
    calls = []
    run = codec.graphs._run
    monkeypatch.setattr(codec.graphs, "_run", lambda graph, x: calls.append(graph) or run(graph, x))
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    z = codec.encode(x, tiled=False)
    assert calls == ["encoder.onnx"]
    torch.testing.assert_close(z, reference.encode(x, tiled=False), rtol=0, atol=1e-4)
    tiled = codec.decode(z, tiled=True, tile_size=32, output_type="pt")  # tiles need PyTorch's blocks
    assert calls == ["encoder.onnx"]
    whole = codec.decode(z, tiled=False, output_type="pt")
    assert calls == ["encoder.onnx", "decoder.onnx"]
    torch.testing.assert_close(whole, reference.decode(z, tiled=False, output_type="pt"), rtol=0, atol=1e-4)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-3)


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
    monkeypatch.setattr(sdvae.onnx, "export_onnx", lambda *a: pytest.fail("exported the same weights again"))
    assert load_vae(str(vae_dir)).graphs is None
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(codec.encode(x), load_vae(str(vae_dir), backend="pytorch").encode(x))

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SDVAE_CACHE_DIR", str(tmp_path / "file"))  # a cache that cannot be written
    with pytest.warns(UserWarning, match="could not be cached"):
        assert load_vae(str(vae_dir)).graphs is None
    with pytest.raises(ValueError, match="backend must be one of auto, pytorch, onnxruntime"):
        load_vae(str(vae_dir), backend="onnx")


@pytest.mark.parametrize("kind", ["tiny-16ch", "student"])
def test_onnx_graphs_of_16_channel_vaes_and_students_match_pytorch(tmp_path, kind):
    torch.manual_seed(0)
    vae = build_student("taesd-16", build_vae("tiny")) if kind == "student" else build_vae("tiny-16ch")
    if kind == "tiny-16ch":
        vae.register_to_config(scaling_factor=0.8, shift_factor=0.1)
    parity = export_onnx(vae, tmp_path / "onnx")
    assert parity["encoder_max_abs_diff"] <= 1e-4 and parity["decoder_max_abs_diff"] <= 1e-4
    vae.save_pretrained(tmp_path / "vae")
    ours, theirs = load_vae(str(tmp_path / "onnx"), backend="onnxruntime"), load_vae(str(tmp_path / "vae"))
    x = torch.rand(3, 3, 40, 56) * 2 - 1
    z = theirs.encode(x)  # scaled: (z - shift) * scale, from the exported factors
    torch.testing.assert_close(ours.encode(x), z, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.decode(z, output_type="pt"), theirs.decode(z, output_type="pt"), rtol=0, atol=1e-4)


def test_a_failed_parity_check_writes_nothing_and_bad_folders_are_named(tmp_path, vae_dir, capsys):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_onnx(build_vae("tiny"), tmp_path / "onnx", bound=0.0)
    assert not (tmp_path / "onnx").exists()
    assert main(["encode", str(vae_dir), "--vae", str(vae_dir), "--backend", "onnxruntime", "--out",
                 str(tmp_path / "z")]) == 2
    assert "encoder.onnx" in capsys.readouterr().err
    assert main(["export", str(vae_dir), "--format", "onnx", "--dtype", "fp16", "--out", str(tmp_path / "x")]) == 2
    assert "fp32" in capsys.readouterr().err


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
