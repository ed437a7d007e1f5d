"""sdvae.inputs: every input form as a list of units, each read on its own, from small real photos."""
import builtins
import io
import json
import os
import pickle
import tarfile

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdvae.inputs import list_units, read_unit
from tests.conftest import write_photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """name -> PNG bytes of six real photos."""
    folder = write_photos(tmp_path_factory.mktemp("photos"), size=48)
    return {p.stem: p.read_bytes() for p in sorted(folder.iterdir())}


def write_tar(path, members):
    """A webdataset shard: (member name, bytes) in order, as tarfile writes them (end blocks included)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(photos, keys):
    return [m for key, photo in zip(keys, photos.values())
            for m in ((f"{key}.png", photo), (f"{key}.json", json.dumps({"key": key}).encode()))]


def read_all(units, image_column="image"):
    """Every unit's samples (checked unique across the dataset) and skips."""
    samples, skipped = [], []
    for unit in units:
        samples += list(read_unit(unit, skipped, image_column))
    keys = [s.key for s in samples]
    assert len(set(keys)) == len(keys)
    return samples, skipped


@pytest.fixture
def shards(tmp_path, photos):
    """Three shards of two samples each: 00000.tar .. 00002.tar."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        write_tar(folder / f"{i:05d}.tar", sample_members(dict(list(photos.items())[2 * i:2 * i + 2]),
                                                          [f"s{2 * i}", f"s{2 * i + 1}"]))
    return folder


def test_tar_shards_by_brace_glob_or_list_are_the_same_units(shards, photos):
    by_brace = list_units(f"{shards}/{{00000..00002}}.tar")
    assert by_brace == list_units(f"{shards}/*.tar") == list_units([str(p) for p in sorted(shards.iterdir())])
    assert [u.name for u in by_brace] == ["00000.tar", "00001.tar", "00002.tar"]
    assert {u.kind for u in by_brace} == {"tar"}
    fingerprint = json.loads(by_brace[0].fingerprint)
    assert fingerprint == dict(path=str(shards / "00000.tar"), size=(shards / "00000.tar").stat().st_size,
                               mtime_ns=(shards / "00000.tar").stat().st_mtime_ns)
    samples, skipped = read_all(by_brace)
    assert [s.key for s in samples] == [f"{i // 2:05d}.tar/s{i}" for i in range(6)]
    assert [s.data for s in samples] == list(photos.values())  # the files' bytes, undecoded
    assert skipped == []
    again, _ = read_all(list_units(f"{shards}/*.tar"))
    assert [(s.key, s.data) for s in again] == [(s.key, s.data) for s in samples]
    assert all(pickle.loads(pickle.dumps(u)) == u for u in by_brace)  # sent to loader workers


def test_missing_shards_in_a_brace_pattern_are_one_error_naming_them(shards):
    with pytest.raises(FileNotFoundError, match=r"2 of the 5 files .* missing: .*00003\.tar, .*00004\.tar"):
        list_units(f"{shards}/{{00000..00004}}.tar")
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        list_units(f"{shards}/*.tgz")
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        list_units(str(shards / "absent.tar"))


def test_samples_without_an_image_are_skipped_and_reading_goes_on(tmp_path, photos):
    a, b = list(photos.values())[:2]
    write_tar(tmp_path / "mixed.tar", [("a.png", a), ("a.json", b"{}"), ("b.txt", b"only a caption"),
                                       ("c.txt", b"caption first"), ("c.seg.JPG", b), ("d/e.jpg", a)])
    samples, skipped = read_all(list_units(str(tmp_path / "mixed.tar")))
    assert [(s.key, s.data) for s in samples] == [("mixed.tar/a", a), ("mixed.tar/c", b), ("mixed.tar/d/e", a)]
    assert skipped == [dict(key="mixed.tar/b", reason="no image file in the sample (members: txt)")]


def test_repeated_keys_and_member_names_are_read_once(tmp_path, photos):
    a, b = list(photos.values())[:2]
    write_tar(tmp_path / "x.tar", [("a.png", a), ("a.png", b), ("b.png", b), ("a.jpg", b)])
    samples, skipped = read_all(list_units(tmp_path / "x.tar"))
    assert [(s.key, s.data) for s in samples] == [("x.tar/a", a), ("x.tar/b", b)]
    assert [s["key"] for s in skipped] == ["x.tar", "x.tar/a"]
    assert skipped[0]["reason"].startswith("member skipped: ValueError: a.png: duplicate file name")
    assert "repeated" in skipped[1]["reason"]


@pytest.mark.parametrize("where", ["in image data", "in a header", "at a member boundary", "in the end blocks"])
def test_a_truncated_tar_keeps_the_samples_before_the_damage(tmp_path, photos, where):
    path = write_tar(tmp_path / "cut.tar", sample_members(photos, ["s0", "s1", "s2", "s3"]))
    with tarfile.open(path) as tar:
        third = tar.getmember("s2.png")
        last = tar.getmembers()[-1]
    cut = {"in image data": third.offset_data + third.size // 2, "in a header": third.offset + 100,
           "at a member boundary": third.offset,
           "in the end blocks": last.offset_data + last.size + 511 + 1024 + 10}[where]
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    skipped = []
    samples = list(read_unit(list_units(str(path))[0], skipped))
    if where == "in the end blocks":  # only zeros were lost: the archive is whole
        assert [s.key for s in samples] == ["cut.tar/s0", "cut.tar/s1", "cut.tar/s2", "cut.tar/s3"]
        assert skipped == []
        return
    # tarfile raises only for a cut in member data; a cut at or in a header ends the shard silently, and the
    # missing end-of-archive blocks tell it was cut
    assert [s.key for s in samples] == ["cut.tar/s0", "cut.tar/s1"]
    assert [s.data for s in samples] == list(photos.values())[:2]
    assert len(skipped) == 1 and skipped[0]["key"] == "cut.tar"
    assert skipped[0]["reason"].startswith("truncated tar after 2 samples: ")


def test_a_tar_cut_after_a_samples_image_keeps_that_image(tmp_path, photos):
    path = write_tar(tmp_path / "cut.tar", sample_members(photos, ["s0", "s1"]))
    with tarfile.open(path) as tar:
        caption = tar.getmember("s1.json")
    path.write_bytes(path.read_bytes()[:caption.offset + 10])  # s1.png whole, its caption cut
    skipped = []
    samples = list(read_unit(list_units(str(path))[0], skipped))
    assert [s.data for s in samples] == list(photos.values())[:2]
    assert [s["reason"].split(":")[0] for s in skipped] == ["truncated tar after 2 samples"]


def test_a_cut_in_the_first_member_of_a_sample_is_not_reported_twice(tmp_path, photos):
    members = [(n, d) for n, d in sample_members(photos, ["s0", "s1"])]
    members = [members[0], members[1], members[3], members[2]]  # s1: caption first, then the image
    path = write_tar(tmp_path / "cut.tar", members)
    with tarfile.open(path) as tar:
        image = tar.getmember("s1.png")
    path.write_bytes(path.read_bytes()[:image.offset_data + 100])
    skipped = []
    assert [s.key for s in read_unit(list_units(str(path))[0], skipped)] == ["cut.tar/s0"]
    assert [s["reason"].split(":")[0] for s in skipped] == ["truncated tar after 1 samples"]


def test_empty_and_garbage_tars_are_recorded_not_raised(tmp_path):
    write_tar(tmp_path / "00000.tar", [])  # no members, end blocks only
    (tmp_path / "00001.tar").write_bytes(b"")
    (tmp_path / "00002.tar").write_bytes(os.urandom(5000))
    samples, skipped = read_all(list_units(f"{tmp_path}/*.tar"))
    assert samples == []
    assert skipped[:2] == [dict(key="00000.tar", reason="empty shard"), dict(key="00001.tar", reason="empty shard")]
    assert skipped[2]["key"] == "00002.tar" and skipped[2]["reason"].startswith("truncated tar after 0 samples: ")


def test_listing_only_stats_files(tmp_path, monkeypatch):
    (tmp_path / "00000.tar").write_bytes(os.urandom(3000))  # garbage: listing never looks inside
    (tmp_path / "x.parquet").write_bytes(b"not parquet either")

    def refuse(*args, **kwargs):
        raise AssertionError(f"list_units opened {args[0]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    assert json.loads(list_units(str(tmp_path / "00000.tar"))[0].fingerprint)["size"] == 3000
    assert list_units(str(tmp_path / "x.parquet"))[0].kind == "parquet"


def write_parquet(path, images):
    """images: paths (Dataset.to_parquet stores those, not the files' bytes) or {bytes, path} dicts."""
    dataset = datasets.Dataset.from_dict({"image": images, "caption": [f"photo {i}" for i in range(len(images))]})
    dataset.cast_column("image", datasets.Image()).to_parquet(str(path))


@pytest.fixture
def parquet_folder(tmp_path, photos):
    """The hub layout: data/train-0000{0,1}-of-00002.parquet (the first with paths, the second with the images'
    bytes and a null image) and a test split."""
    files = tmp_path / "files"
    files.mkdir()
    for name, data in photos.items():
        (files / f"{name}.png").write_bytes(data)
    paths = [str(files / f"{name}.png") for name in photos]
    embedded = [{"bytes": data, "path": None} for data in list(photos.values())[3:]]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "hub/data/train-00000-of-00002.parquet", paths[:3])
    write_parquet(tmp_path / "hub/data/train-00001-of-00002.parquet", embedded + [None])
    write_parquet(tmp_path / "hub/data/test-00000-of-00001.parquet", paths[:1])
    return tmp_path / "hub"


def test_parquet_files_are_units_read_row_by_row(parquet_folder, photos):
    units = list_units(str(parquet_folder))
    names = ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [u.name for u in units] == names and {u.kind for u in units} == {"parquet"}
    assert list_units(f"{parquet_folder}/data/train-*.parquet") == units
    samples, skipped = read_all(units)
    assert [s.key for s in samples] == [f"{names[i // 3]}/{i % 3}" for i in range(6)]
    assert [s.data for s in samples] == list(photos.values())
    assert skipped == [dict(key=f"{names[1]}/3", reason="no image (empty cell)")]
    assert [u.name for u in list_units(str(parquet_folder), split="test")] == ["test-00000-of-00001.parquet"]
    with pytest.raises(ValueError, match="no parquet files of split 'validation'; it has test, train"):
        list_units(str(parquet_folder), split="validation")


def test_parquet_with_plain_bytes_and_bad_cells(tmp_path, photos):
    a = list(photos.values())[0]
    pq.write_table(pa.table({"img": [a, None, a]}), tmp_path / "plain.parquet", row_group_size=2)
    cells = [{"bytes": None, "path": str(tmp_path / "gone.png")}, {"bytes": a, "path": None}]
    pq.write_table(pa.table({"img": cells}), tmp_path / "paths.parquet")
    pq.write_table(pa.table({"img": ["a caption"]}), tmp_path / "text.parquet")
    units = list_units(f"{tmp_path}/{{plain,paths,text}}.parquet")
    samples, skipped = read_all(units, image_column="img")
    assert [s.key for s in samples] == ["plain.parquet/0", "plain.parquet/2", "paths.parquet/1"]
    assert skipped[0] == dict(key="plain.parquet/1", reason="no image (empty cell)")
    assert skipped[1]["key"] == "paths.parquet/0"
    assert "gone.png could not be read: FileNotFoundError" in skipped[1]["reason"]
    assert skipped[2] == dict(key="text.parquet/0", reason="the image cell holds str, not bytes")
    with pytest.raises(ValueError, match=r"image column 'image' not in .*plain\.parquet; columns: img"):
        list(read_unit(list_units(str(tmp_path / "plain.parquet"))[0], []))


def test_a_saved_dataset_reads_its_arrow_files(tmp_path, photos):
    rows = {"image": [{"bytes": b, "path": None} for b in photos.values()]}
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    units = list_units(str(tmp_path / "saved"))
    assert [u.name for u in units] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    samples, skipped = read_all(units)
    assert [s.data for s in samples] == list(photos.values()) and skipped == []
    assert samples[3].key == "data-00001-of-00002.arrow/0"

    datasets.DatasetDict(train=dataset, test=dataset.select([0])).save_to_disk(str(tmp_path / "dict"))
    test_units = list_units(str(tmp_path / "dict"), split="test")
    assert [s.data for s in read_all(test_units)[0]] == list(photos.values())[:1]
    with pytest.raises(ValueError, match="no split 'valid'; it has train, test"):
        list_units(str(tmp_path / "dict"), split="valid")


@pytest.fixture
def image_folder(tmp_path, photos):
    """Six photos in three folders: a/, a/b/ and the top."""
    names = list(photos)
    for folder, chosen in (("", names[:2]), ("a", names[2:4]), ("a/b", names[4:])):
        write_photos(tmp_path / "images" / folder, size=48, names=chosen)
    return tmp_path / "images"


def test_a_folder_is_fixed_slices_whose_fingerprints_follow_their_files(image_folder):
    units = list_units(str(image_folder), shard_size=2)
    assert [u.name for u in units] == ["folder-000000", "folder-000001", "folder-000002"]
    listing = [m for u in units for m in u.files]
    assert listing == sorted(listing) and len(listing) == 6 and listing[0].startswith("a/")
    assert units == list_units(str(image_folder), shard_size=2)
    members = json.loads(units[1].fingerprint)["files"]
    assert [m[0] for m in members] == list(units[1].files) and all(m[1] > 0 for m in members)

    changed = image_folder / units[1].files[0]
    changed.write_bytes(changed.read_bytes() + b"\0")
    os.utime(changed, ns=(1, 1))
    after = list_units(str(image_folder), shard_size=2)
    assert [u.fingerprint == v.fingerprint for u, v in zip(units, after)] == [True, False, True]

    samples, skipped = read_all(after)
    assert [s.key for s in samples] == [f"folder-{i // 2:06d}/{m}" for i, m in enumerate(listing)]
    assert samples[2].data == changed.read_bytes() and skipped == []


def test_a_folder_file_gone_since_listing_is_skipped(image_folder):
    unit = list_units(str(image_folder), shard_size=4)[0]
    (image_folder / unit.files[1]).unlink()
    skipped = []
    keys = [s.key for s in read_unit(unit, skipped)]
    assert keys == [f"folder-000000/{m}" for m in unit.files if m != unit.files[1]]
    assert skipped == [dict(key=f"folder-000000/{unit.files[1]}",
                            reason="FileNotFoundError: No such file or directory")]


def test_file_names_that_are_not_utf8(tmp_path, photos):
    a = list(photos.values())[0]
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(a)
    unit = list_units(str(folder))[0]
    json.loads(unit.fingerprint)
    assert [s.key for s in read_unit(unit, [])] == ["folder-000000/caf\\xe9.png"]

    tar = write_tar(tmp_path / os.fsdecode(b"\xff.tar"), [(os.fsdecode(b"k\xe9.png"), a), ("z.txt", b"")])
    skipped = []
    units = list_units([str(tar)])
    assert units[0].name == "\\xff.tar"
    assert [s.key for s in read_unit(units[0], skipped)] == ["\\xff.tar/k\\xe9"]
    assert skipped == [dict(key="\\xff.tar/z", reason="no image file in the sample (members: txt)")]


def test_shards_of_the_same_name_in_two_folders_get_distinct_names(tmp_path, photos):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_tar(tmp_path / folder / "00000.tar", sample_members(photos, ["s"]))
    units = list_units(f"{tmp_path}/*/00000.tar")
    assert [u.name for u in units] == ["a__00000.tar", "b__00000.tar"]
    assert len({s.key for s in read_all(units)[0]}) == 2


def test_empty_unknown_and_mixed_data_are_one_error(tmp_path, shards, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in .*empty"):
        list_units(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nothing matches .*nope"):
        list_units(str(tmp_path / "nope"))  # an absolute path is never taken for a hub name
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes parquet and tar files"):
        list_units([str(shards / "00000.tar"), str(tmp_path / "x.parquet")])
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="notes.txt is not a .tar, .parquet or .arrow file"):
        list_units(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="shard_size"):
        list_units(str(shards), shard_size=0)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    with pytest.raises(FileNotFoundError, match="'someone/photos' is not a local path, and the Hugging Face hub"):
        list_units("someone/photos")

