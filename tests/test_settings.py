"""Every command's settings: each numeric one finite and in its range (walked field by field, so a setting added
without a range fails here), YAML keys that are not names, and outputs that never replace what sdvae did not
write."""
import dataclasses
import json
import math
import typing

import pytest

from sdvae.cache import CACHE_RANGES, CacheSettings, build_cache
from sdvae.cli import main
from sdvae.config import TRAIN_RANGES, TrainConfig, check_ranges, load_config, read_config_file
from sdvae.evaluate import EVAL_RANGES, EvalSettings, evaluate
from sdvae.files import LOCK_NAME, OUTPUT_RECORD, ForeignOutput, prepare_output_folder
from sdvae.probe import PROBE_RANGES, ProbeSettings, earlier_probe, probe
from tests.conftest import write_photos

COMMANDS = [(ProbeSettings, PROBE_RANGES), (EvalSettings, EVAL_RANGES), (CacheSettings, CACHE_RANGES)]


def numeric_fields(cls):
    """(name, int or float, is a tuple) of each field whose type is a number, an optional one or a tuple of them."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        args = typing.get_args(hints[field.name]) or (hints[field.name],)
        kinds = [a for a in args if a in (int, float)]
        if kinds:
            yield field.name, kinds[0], typing.get_origin(hints[field.name]) is tuple


def outside(allowed):
    """A value just outside the range: its low end (or below it), else its high end (or above it)."""
    if math.isfinite(allowed.low):
        return allowed.low if allowed.open_low else allowed.low - 1
    return allowed.high if allowed.open_high else allowed.high + 1


def bad_values(kind, allowed):
    value = outside(allowed)
    return [math.nan, math.inf, -math.inf, int(value) if kind is int and float(value).is_integer() else value]


@pytest.mark.parametrize("cls, ranges", [(TrainConfig, TRAIN_RANGES), *COMMANDS],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_every_numeric_field_has_a_bounded_range(cls, ranges):
    names = {name for name, _, _ in numeric_fields(cls)}
    assert names == set(ranges), f"without a range: {names - set(ranges)}; ranges of no field: {set(ranges) - names}"
    for name in names:
        assert math.isfinite(ranges[name].low) or math.isfinite(ranges[name].high), name


@pytest.mark.parametrize("name, kind, is_tuple", list(numeric_fields(TrainConfig)), ids=lambda x: str(x))
def test_train_refuses_non_finite_and_out_of_range_values_naming_the_key(name, kind, is_tuple):
    for bad in bad_values(kind, TRAIN_RANGES[name]):
        text = str(bad)
        value = ",".join([text, text]) if is_tuple else text  # as on the command line: key=value
        with pytest.raises(ValueError) as error:
            load_config(overrides={name: value})
        assert name in str(error.value), (value, str(error.value))


@pytest.mark.parametrize("cls, ranges", COMMANDS, ids=lambda x: getattr(x, "__name__", ""))
def test_command_settings_refuse_non_finite_and_out_of_range_values_naming_the_flag(cls, ranges):
    for name, kind, _ in numeric_fields(cls):
        for bad in bad_values(kind, ranges[name]):
            with pytest.raises(ValueError) as error:
                cls(**{name: bad})
            assert f"--{name.replace('_', '-')}" in str(error.value), (name, bad, str(error.value))
            assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("overrides", [
    ["kl_weight=inf"], ["disc_weight=inf"], ["max_grad_norm=nan"], ["posterior_logvar_init=inf"],
    ["model=taesd", "teacher=some/vae", "latent_weight=nan"], ["equivariance_weight=nan"], ["max_minutes=nan"],
    ["preview_images=-1"], ["checkpoints_total_limit=-1"], ["val_max_images=0"], ["learning_rate=0"],
    ["adam_beta2=1"], ["seed=-1"], ["equivariance_scales=0.25,inf"], ["logvar_init=1e6"], ["max_steps=inf"],
])
def test_the_values_found_by_the_fault_campaign_are_refused(overrides):
    key = overrides[-1].partition("=")[0]
    with pytest.raises(ValueError, match=key):
        load_config(overrides=overrides)


def test_the_ends_of_each_range_that_mean_something_are_accepted():
    cfg = load_config(overrides=["max_grad_norm=0", "checkpoints_total_limit=0", "preview_images=0", "max_minutes=0",
                                 "posterior_logvar_init=-30", "adam_beta1=0", "ema_decay=0", "skip_log_limit=0",
                                 "seed=4294967295", "equivariance_scales=1,1"])
    assert cfg.max_grad_norm == 0 and cfg.checkpoints_total_limit == 0 and cfg.posterior_logvar_init == -30
    ProbeSettings(samples=0, minutes=0.5, learning_rate=1e-3)
    EvalSettings(grid_images=0, max_images=1)
    CacheSettings(num_workers=0, seed=0)


def test_non_finite_values_in_a_yaml_file_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("kl_weight: .inf\n")
    with pytest.raises(ValueError, match="kl_weight"):
        load_config(tmp_path / "c.yaml")


def test_a_numeric_field_without_a_range_is_a_programming_error():
    @dataclasses.dataclass
    class Settings:
        steps: int = 1
        rate: float | None = None

    with pytest.raises(TypeError, match="Settings.rate has no range"):
        check_ranges(Settings(), {"steps": TRAIN_RANGES["max_steps"]})


@pytest.mark.parametrize("text, line", [
    ("? [a, b]\n: 1\n", 1), ("? {a: 1}\n: 2\n", 1), ("kl_weight: 1\n[a, b]: 1\n", 2), ("kl_weight: 1\n{a: 1}: 2\n", 2),
    ("<<: {kl_weight: 1}\n", 1), ("? \n: 1\n", 1), ("kl_weight: 1\n? - a\n  - b\n: 1\n", 2),
])
def test_yaml_keys_that_are_not_names_are_one_error_with_the_file_and_line(tmp_path, capsys, text, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_config_file(path)
    assert f"{path}:{line}:" in str(error.value) and "config keys are names" in str(error.value)
    assert main(["train", "--config", str(path), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{path}:{line}:" in err and "Traceback" not in err


def test_probe_learning_rate_inf_is_one_line_naming_the_flag(tmp_path, vae_dir, capsys):
    photos = write_photos(tmp_path / "photos", size=32, names=("astronaut", "coffee"))
    assert main(["probe", "--vae", str(vae_dir), "--data", str(photos), "--out", str(tmp_path / "out"),
                 "--learning-rate", "inf"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--learning-rate" in err and "finite" in err
    assert not (tmp_path / "out").exists()


# --- outputs --------------------------------------------------------------------------------------------------

def foreign_folder(folder):
    """A folder of someone else's files (notes and a git repository); returns what it holds."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("my notes")
    return contents(folder)


def contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(call, folder, before):
    with pytest.raises(ForeignOutput) as error:
        call()
    message = str(error.value)
    assert str(folder) in message and "--overwrite" in message and len(message.splitlines()) == 1
    assert contents(folder) == before


EVAL = dict(resolution=32, max_images=2, no_lpips=True, no_fid=True, device="cpu", grid_images=1)


@pytest.mark.slow
def test_eval_refuses_a_foreign_folder_and_accepts_its_own(tmp_path, vae_dir, photos, capsys):
    out = tmp_path / "out"
    before = foreign_folder(out)
    assert_refused(lambda: evaluate({"v": str(vae_dir)}, str(photos), str(out), EvalSettings(**EVAL)), out, before)
    assert main(["eval", "--vae", str(vae_dir), "--data", str(photos), "--out", str(out), "--no-lpips",
                 "--no-fid"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err and contents(out) == before
    evaluate({"v": str(vae_dir)}, str(photos), str(out), EvalSettings(**EVAL, overwrite=True))
    assert (out / "metrics.json").is_file() and all(contents(out)[k] == v for k, v in before.items())

    own = tmp_path / "own"
    evaluate({"v": str(vae_dir)}, str(photos), str(own), EvalSettings(**EVAL))
    evaluate({"v": str(vae_dir)}, str(photos), str(own), EvalSettings(**EVAL))  # a re-run
    (own / OUTPUT_RECORD).unlink()  # as an sdvae without output records left it
    (own / "notes.txt").write_text("added later")
    evaluate({"v": str(vae_dir)}, str(photos), str(own), EvalSettings(**EVAL))
    assert (own / OUTPUT_RECORD).is_file() and (own / "notes.txt").read_text() == "added later"


def test_cache_latents_refuses_a_foreign_folder_and_reuses_its_own(tmp_path, vae_dir, photos):
    out = tmp_path / "out"
    before = foreign_folder(out)
    assert_refused(lambda: build_cache(str(vae_dir), photos, out, resolution=32, num_workers=0), out, before)

    own = tmp_path / "cache"
    first = build_cache(str(vae_dir), photos, own, resolution=32, num_workers=0, progress=False)
    (own / OUTPUT_RECORD).unlink()  # a cache an sdvae without output records wrote
    again = build_cache(str(vae_dir), photos, own, resolution=32, num_workers=0, progress=False)
    assert again["reused_units"] == first["encoded_units"] and again["encoded"] == 0


def test_probe_refuses_a_foreign_folder_and_knows_its_own(tmp_path, vae_dir):
    photos = write_photos(tmp_path / "photos", size=32, names=("astronaut", "coffee", "chelsea"))
    out = tmp_path / "out"
    before = foreign_folder(out)
    settings = ProbeSettings(resolution=32, steps=1, val_images=2, val_data=str(photos), no_fid=True, device="cpu")
    assert_refused(lambda: probe({"v": str(vae_dir)}, str(photos), str(out), settings), out, before)
    assert not earlier_probe(out)

    earlier = tmp_path / "earlier"  # a probe of an sdvae without output records, killed after a checkpoint
    (earlier / "denoisers" / "v").mkdir(parents=True)
    (earlier / "denoisers" / "v" / "state.json").write_text(json.dumps(dict(step=6)))
    (earlier / "notes.txt").write_text("the user's")
    assert earlier_probe(earlier)
    prepare_output_folder(earlier, "probe", earlier_probe(earlier))
    assert (earlier / OUTPUT_RECORD).is_file()
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "metrics.json").write_text(json.dumps(dict(vaes={}, protocol={}, image_spectrum={})))
    assert earlier_probe(finished)
    killed = tmp_path / "killed"  # before its first checkpoint: the lock a `sdvae probe` took, and a partial cache
    (killed / "latents" / "v" / "shards").mkdir(parents=True)
    (killed / LOCK_NAME).write_text(json.dumps(dict(pid=1, host="h", started="t", command="sdvae probe --vae v")))
    assert earlier_probe(killed)
    (killed / LOCK_NAME).write_text(json.dumps(dict(pid=1, host="h", started="t", command="sdvae train")))
    assert not earlier_probe(killed)
