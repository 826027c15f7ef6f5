"""Writes and locks in folders where someone else may have planted links or may swap files."""
import os
import shutil

import numpy as np
import pytest

from conftest import make_images
from dataset import TrainDataset
from machinery import datacache, files
from machinery.files import atomic_path, lock_folder
from utils import UserError


def test_a_link_under_a_folders_lock_name_is_refused_and_its_target_not_made(tmp_path):
    pytest.importorskip("fcntl")
    target = tmp_path / "target"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(target)
    with pytest.raises(UserError, match=r"\.lock: a link"):
        lock_folder(tmp_path / "run")
    assert not os.path.lexists(target)


def test_a_link_under_the_data_caches_lock_name_is_refused_and_its_target_not_made(tmp_path):
    pytest.importorskip("fcntl")
    photos, cache, target = make_images(tmp_path / "photos"), tmp_path / "cache", tmp_path / "target"
    cache.mkdir()
    source = datacache.made_from(sorted(photos.iterdir()), hr_dir=photos, scale=4, degradation="pil")
    datacache.lock_path(cache / datacache.cache_name(photos, source)).symlink_to(target)
    with pytest.raises(UserError, match=r"\.lock: a link"):
        TrainDataset(photos, cache_dir=cache, scale=4, patch_size=32, quiet=True)
    assert not os.path.lexists(target)


def test_a_temporary_swapped_for_a_link_is_refused_and_the_links_target_keeps_its_mode(tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"keep")
    target.chmod(0o600)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="was replaced while being written"):
        with atomic_path(tmp_path / "out" / "a.png") as tmp:
            open(tmp, "wb").write(b"png")
            os.unlink(tmp)
            os.symlink(target, tmp)  # by someone who may write to the folder
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_bytes() == b"keep"
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("write", ["atomic_path", "lock_folder", "data cache"])
def test_a_folder_anyone_may_write_to_is_refused_unless_sticky(tmp_path, write):
    if write == "lock_folder":
        pytest.importorskip("fcntl")
    photos = make_images(tmp_path / "photos")
    shared = tmp_path / "shared"
    shared.mkdir()

    def do():
        if write == "atomic_path":
            with atomic_path(shared / "a.png") as tmp:
                open(tmp, "wb").write(b"png")
        elif write == "lock_folder":
            lock_folder(shared).close()
        else:
            TrainDataset(photos, cache_dir=shared, scale=4, patch_size=32, quiet=True)

    shared.chmod(0o777)
    with pytest.raises(UserError, match="anyone may write to this folder"):
        do()
    assert os.listdir(shared) == []
    shared.chmod(0o1777)  # as /tmp: nobody may remove or rename another's files there
    do()
    assert os.listdir(shared)


@pytest.mark.parametrize("free, said", [(0, "the disk is full"), (400_000, "the disk is full"),
                                        (30_000_000, "30.0 MB free"), (940_000_000, "940.0 MB free"),
                                        (12_340_000_000, "12.3 GB free")])
def test_free_space_is_said_in_units_that_show_it(tmp_path, monkeypatch, free, said):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, free))
    assert files.free_space(tmp_path) == said


def test_a_full_disk_is_said_from_the_space_left_before_the_partial_write_is_removed(tmp_path, monkeypatch):
    temporaries = []

    def usage(path):  # the partial write holds 60 MB: free again once it is removed
        full = any(os.path.exists(t) for t in temporaries)
        return shutil._ntuple_diskusage(10**9, 10**9, 100_000 if full else 60_100_000)

    monkeypatch.setattr(files.shutil, "disk_usage", usage)
    with pytest.raises(UserError, match=r"a\.pt: could not be written \(No space left on device; the disk is full\); "
                                        r"nothing was written"):
        with atomic_path(tmp_path / "a.pt") as tmp:
            temporaries.append(tmp)
            raise OSError(28, os.strerror(28))
    assert os.listdir(tmp_path) == []


def test_a_cache_index_with_float_sizes_and_a_valid_checksum_is_built_again(tmp_path, capsys):
    photos, cache = make_images(tmp_path / "photos"), tmp_path / "cache"
    built = TrainDataset(photos, cache_dir=cache, scale=4, patch_size=32)
    expected = [np.array(a) for a in built.hr + built.lr]
    del built
    [path] = cache.glob("*.cache")
    header = datacache.whole_header(path)
    for item in header["images"]:
        item["hr"] = [float(x) for x in item["hr"]]  # still in bounds, still the scale times the LR
        item["lr"] = [float(x) for x in item["lr"]]
    rewrite_header(path, header)
    capsys.readouterr()
    again = TrainDataset(photos, cache_dir=cache, scale=4, patch_size=32)
    assert f"{path}: torn (cut short or damaged), not used: building it again" in capsys.readouterr().err
    assert all(np.array_equal(a, b) for a, b in zip(again.hr + again.lr, expected))


def rewrite_header(path, header: dict) -> None:
    """Replace the cache's JSON header, with a checksum that matches it, as a hand edit would."""
    import hashlib
    import json
    data = bytearray(path.read_bytes())
    offset, length, _ = datacache.PREFIX.unpack_from(data, len(datacache.MAGIC))
    text = json.dumps(header).encode()
    data[offset:] = text
    data[len(datacache.MAGIC):len(datacache.MAGIC) + datacache.PREFIX.size] = datacache.PREFIX.pack(
        offset, len(text), hashlib.sha256(text).digest())
    path.write_bytes(bytes(data))


def test_names_in_messages_show_their_control_characters_escaped(tmp_path):
    name = tmp_path / "a\x1b]0;pwned\x07.png"  # would set the terminal's title
    name.write_bytes(b"x")
    with pytest.raises(UserError) as error:
        files.check_output_file(name)
    assert "\x1b" not in str(error.value) and "a\\x1b]0;pwned\\x07.png: exists" in str(error.value)
