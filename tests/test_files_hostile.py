"""Writes and locks in folders where someone else may have planted links or may swap files."""
import os

import pytest

from conftest import make_images
from dataset import TrainDataset
from machinery import datacache
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
