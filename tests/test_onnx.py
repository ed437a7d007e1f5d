"""ONNX export (`sdvae export --format onnx`) and the onnxruntime backend, against PyTorch."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdvae.cli import main
from sdvae.codec import load_vae
from sdvae.distill import build_student
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

    for backend in ("pytorch", "onnxruntime"):  # the same files through both backends
        assert main(["encode", str(photos), "--vae", str(out if backend == "onnxruntime" else vae_dir),
                     "--backend", backend, "--out", str(tmp_path / f"z-{backend}")]) == 0
        assert main(["decode", str(tmp_path / f"z-{backend}"), "--vae", str(out if backend == "onnxruntime" else vae_dir),
                     "--backend", backend, "--out", str(tmp_path / f"x-{backend}")]) == 0
    names = sorted(p.name for p in (tmp_path / "z-pytorch").glob("*.safetensors"))
    assert names and names == sorted(p.name for p in (tmp_path / "z-onnxruntime").glob("*.safetensors"))
    for name in names:  # photos of several sizes and aspects: the graphs' axes are dynamic
        a, b = (load_file(tmp_path / f"z-{k}" / name)["latent"] for k in ("pytorch", "onnxruntime"))
        assert (a - b).abs().max() <= 1e-4
        png = name.replace(".safetensors", ".png")
        x, y = (np.asarray(Image.open(tmp_path / f"x-{k}" / png), np.int16) for k in ("pytorch", "onnxruntime"))
        assert x.shape == y.shape and np.abs(x - y).max() <= 1


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
