"""The default CPU path's cache of ONNX graphs: each entry is verified against its manifest before it runs; a bad
one is named in one line on stderr and exported again, or PyTorch runs this time."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

import sdvae.onnx
from sdvae.codec import load_vae
from sdvae.files import FolderLock
from sdvae.models import build_vae
from sdvae.onnx import export_onnx, manifest_problem, weights_key

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def template(tmp_path_factory, vae_dir):
    """A cache holding vae_dir's verified entry, and another VAE's export: tests damage copies of them."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("template")
    key = weights_key(AutoencoderKL.from_pretrained(vae_dir))
    export_onnx(AutoencoderKL.from_pretrained(vae_dir), root / "cache" / "onnx" / key, overwrite=True)
    torch.manual_seed(1)
    export_onnx(build_vae("tiny"), root / "other")
    return root, key


@pytest.fixture
def cache(template, tmp_path, monkeypatch):
    """(the entry of vae_dir's VAE in a fresh copy of the template cache, the other VAE's export)."""
    root, key = template
    shutil.copytree(root / "cache", tmp_path / "cache")
    monkeypatch.delenv("SDVAE_BACKEND")  # load_vae's own default: auto, which uses the cache
    monkeypatch.setenv("SDVAE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx" / key, root / "other"


def assert_runs_like_pytorch(codec, vae_dir):
    reference = load_vae(str(vae_dir), backend="pytorch")
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    z = codec.encode(x, tiled=False)
    torch.testing.assert_close(z, reference.encode(x, tiled=False), rtol=0, atol=1e-4)
    torch.testing.assert_close(codec.decode(z, tiled=False, output_type="pt"),
                               reference.decode(z, tiled=False, output_type="pt"), rtol=0, atol=1e-4)


def damage(entry, other, how):
    graph = entry / "vae_decoder" / "model.onnx"
    if how == "truncated":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif how == "garbage":  # the same size: only the checksum tells
        graph.write_bytes(np.random.default_rng(0).bytes(graph.stat().st_size))
    elif how == "another VAE's graph":
        shutil.copy(other / "vae_decoder" / "model.onnx", graph)
    elif how == "another VAE's entry":  # valid graphs and a valid manifest, made for another key
        shutil.rmtree(entry)
        shutil.copytree(other, entry)
    elif how == "an older format":
        manifest = json.loads((entry / "sdvae-onnx.json").read_text())
        (entry / "sdvae-onnx.json").write_text(json.dumps(manifest | {"format": 1}))
    elif how == "format 1 (no manifest)":
        (entry / "sdvae-onnx.json").unlink()
    elif how == "a garbage manifest":
        (entry / "sdvae-onnx.json").write_bytes(b"\xff\x00 not json")


DAMAGES = ["truncated", "garbage", "another VAE's graph", "another VAE's entry", "an older format",
           "format 1 (no manifest)", "a garbage manifest"]
REASONS = {"truncated": "bytes, not", "garbage": "does not match its sha256",
           "another VAE's graph": "bytes, not|does not match its sha256",
           "another VAE's entry": "made for another VAE", "an older format": "format 1 in sdvae-onnx.json, not 2",
           "format 1 (no manifest)": "no sdvae-onnx.json", "a garbage manifest": "sdvae-onnx.json cannot be read"}


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_a_bad_cache_entry_is_named_in_one_line_and_exported_again(cache, vae_dir, capsys, recwarn, monkeypatch,
                                                                   how):
    entry, other = cache
    damage(entry, other, how)
    capsys.readouterr()
    codec = load_vae(str(vae_dir))
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"the cached ONNX graphs in {entry} are unusable" in line and "exporting them again" in line
    assert re.search(REASONS[how], line), line
    assert not [w for w in recwarn if "ONNX" in str(w.message)]
    assert codec.graphs is not None
    assert_runs_like_pytorch(codec, vae_dir)

    # healed: the next load verifies the new entry and runs it, without a word or an export
    assert manifest_problem(entry, entry.name) is None
    monkeypatch.setattr(sdvae.onnx, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    codec = load_vae(str(vae_dir))
    assert codec.graphs is not None and capsys.readouterr().err == ""
    assert_runs_like_pytorch(codec, vae_dir)


@pytest.mark.slow
def test_a_bad_entry_that_cannot_be_exported_again_runs_pytorch_this_time(cache, vae_dir, capsys):
    entry, other = cache
    damage(entry, other, "garbage")
    with FolderLock(entry.parent), pytest.warns(UserWarning) as warned:  # another process is exporting
        codec = load_vae(str(vae_dir))
    [warning] = [w for w in warned if "ONNX" in str(w.message)]
    assert f"running PyTorch: the ONNX graphs could not be cached in {entry.parent}" in str(warning.message)
    assert f"{entry} is unusable (vae_decoder/model.onnx does not match its sha256)" in str(warning.message)
    assert codec.graphs is None and capsys.readouterr().err == ""
    assert_runs_like_pytorch(codec, vae_dir)
    assert load_vae(str(vae_dir)).graphs is not None  # the lock released: exported again
    assert manifest_problem(entry, entry.name) is None


def test_verified_entries_skip_the_scan_for_non_finite_weights_and_user_folders_do_not(cache, vae_dir, monkeypatch,
                                                                                      tmp_path):
    entry, _ = cache
    scanned = []
    check = sdvae.onnx.check_finite_weights
    monkeypatch.setattr(sdvae.onnx, "check_finite_weights", lambda path: scanned.append(path) or check(path))
    assert load_vae(str(vae_dir)).graphs is not None
    assert scanned == []  # its sha256 matched the manifest written with graphs of finite weights
    shutil.copytree(entry, tmp_path / "copy")
    load_vae(str(tmp_path / "copy"))  # the same graphs as a user's folder: scanned
    assert [p.relative_to(tmp_path / "copy").as_posix() for p in scanned] == ["vae_encoder/model.onnx",
                                                                              "vae_decoder/model.onnx"]
