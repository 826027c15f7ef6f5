"""The decoded training-set cache: the same patches as decoding, reused while the images are
unchanged, built again when they change or the file is torn, and never trusting what it did not make."""
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import ROOT, TINY_RUN, assert_one_line_error, make_images, run_main
from dataset import EpochSampler, PatchLoader, TrainDataset
from machinery import datacache, images
from test_run_folders import run_with_file_size_limit
from utils import UserError


def dataset(folder, cache, **kw):
    kw = {"scale": 4, "patch_size": 32, "patches_per_image": 4, "seed": 0, **kw}
    return TrainDataset(folder, cache_dir=cache, **kw)


def epoch_batches(data, epoch: int) -> list:
    sampler = EpochSampler(data, seed=0)
    sampler.set_epoch(epoch)
    return [t for batch in PatchLoader(data, sampler, batch_size=4, num_workers=2) for t in batch]


def one_epoch_on(photos, tmp_path, *flags) -> list:
    """train.py's flags for one tiny epoch on `photos`, validated on tmp_path/val, its runs in tmp_path/runs."""
    return ["--train_dir", photos, "--val_dir", make_images(tmp_path / "val"), "--checkpoint_dir", tmp_path / "runs",
            "--num_epochs", "1", *TINY_RUN, *flags]


def cache_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(datacache.SUFFIX))


@pytest.fixture
def photos(tmp_path):
    """make_images' three, an unreadable file and an image smaller than the patch."""
    folder = make_images(tmp_path / "photos")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((21, 42, 3), 7, np.uint8)).save(folder / "small.png")
    return folder


@pytest.mark.parametrize("degradation", ["pil", "matlab"])
def test_the_cache_gives_the_same_images_and_patches_as_decoding_into_memory(photos, tmp_path, capsys, degradation):
    memory = dataset(photos, None, degradation=degradation)
    built = dataset(photos, tmp_path / "cache", degradation=degradation)
    reused = dataset(photos, tmp_path / "cache", degradation=degradation)
    out = capsys.readouterr()
    assert "data cache: built" in out.out and "data cache: reusing" in out.out
    assert out.err.count("skipping 2 of 5 images: broken.png") == 3  # the same warning, each time
    assert out.err.count("small.png (42x21, smaller than the 32px patch)") == 3  # its own size, not the cropped
    for data in (built, reused):
        assert data.paths == memory.paths
        assert all(np.array_equal(a, b) for a, b in zip(data.hr + data.lr, memory.hr + memory.lr))
        assert not data.hr[0].flags.writeable  # mapped read-only: no process can change another's data
        for epoch in (0, 3):
            assert all(torch.equal(a, b) for a, b in zip(epoch_batches(data, epoch), epoch_batches(memory, epoch)))


def test_a_second_run_maps_the_cache_without_decoding(photos, tmp_path, monkeypatch, capsys):
    first = dataset(photos, tmp_path / "cache")

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(images, "load_rgb", no_decoding)
    again = dataset(photos, tmp_path / "cache", patch_size=48)  # another patch size maps the same file
    assert [p.name for p in again.paths] == ["img0.png", "img1.png", "img2.png"]
    assert np.array_equal(again.lr[2], first.lr[2])
    assert f"data cache: reusing {tmp_path / 'cache' / cache_files(tmp_path / 'cache')[0]}" in capsys.readouterr().out


def test_a_changed_folder_builds_a_new_cache_and_removes_the_old_one(photos, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    dataset(photos, cache)
    dataset(photos, cache, scale=2)  # another scale: another cache, kept beside
    [x2, first] = cache_files(cache)
    assert x2.startswith("photos.x2.pil.") and first.startswith("photos.x4.pil.")
    capsys.readouterr()
    stat = (photos / "img1.png").stat()
    os.utime(photos / "img1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: maybe changed
    monkeypatch.chdir(tmp_path)
    changed = dataset("photos", cache)  # the same folder, named relative to here
    out = capsys.readouterr().out
    [x2_after, second] = cache_files(cache)
    assert second != first and x2_after == x2
    assert not (cache / f".{first}.lock").exists()
    assert f"data cache: removed {cache / first}, made from an earlier state of {photos}" in out
    shutil.copy(photos / "img2.png", photos / "img3.png")  # one more image
    assert len(dataset(photos, cache).paths) == len(changed.paths) + 1
    assert len(cache_files(cache)) == 2


@pytest.mark.parametrize("damage", ["cut short", "header offset", "header bytes", "header bit", "empty", "magic cut"])
def test_a_torn_cache_is_built_again(photos, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    built = dataset(photos, cache)
    expected = [np.array(a) for a in built.hr + built.lr]  # copies: the file is cut under its mapping
    del built
    path = cache / cache_files(cache)[0]
    data = bytearray(path.read_bytes())
    if damage == "cut short":
        data = data[:len(data) // 2]
    elif damage == "header offset":
        data[len(datacache.MAGIC)] ^= 0x10
    elif damage == "header bytes":
        data[-5:] = b"?????"
    elif damage == "header bit":  # one bit of an image's width: still JSON, still in bounds
        at = data.rindex(b'"hr": [') + len(b'"hr": [') + 8
        data[at] ^= 0x01
    else:  # a file cut before the end of its first bytes
        data = b"" if damage == "empty" else data[:10]
    path.write_bytes(bytes(data))
    capsys.readouterr()
    again = dataset(photos, cache)
    assert f"{path}: torn (cut short or damaged), not used: building it again" in capsys.readouterr().err
    assert all(np.array_equal(a, b) for a, b in zip(again.hr + again.lr, expected))
    assert datacache.read_header(path, again_source(photos), say=False) is not None


def again_source(photos):
    return datacache.made_from(images.list_images(photos), hr_dir=photos, scale=4, degradation="pil")


def test_other_processes_of_a_machine_wait_for_the_first_to_build_and_map_its_file(photos, tmp_path, monkeypatch):
    cache, paths, source = tmp_path / "cache", images.list_images(photos), again_source(photos)
    cache.mkdir()
    path = cache / datacache.cache_name(photos, source)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a second process of this machine: it never builds
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(datacache.mapped_pairs, paths, hr_dir=photos, scale=4, degradation="pil", cache_dir=cache,
                              num_threads=1, quiet=True)
        time.sleep(0.5)
        assert not waiting.done() and not path.exists()
        datacache.build(path, paths, source, hr_dir=photos, num_threads=1, quiet=True)  # as LOCAL_RANK 0 does
        pairs = waiting.result(timeout=10)
    pairs = {p.name: pair for p, pair in zip(paths, pairs)}
    assert np.array_equal(pairs["img0.png"][0], images.load_rgb(photos / "img0.png")[:64, :80])
    assert pairs["broken.png"].startswith("not a readable image")


def test_a_second_run_waits_for_the_one_building_and_reuses_its_file(photos, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    cache, paths, source = tmp_path / "cache", images.list_images(photos), again_source(photos)
    cache.mkdir()
    path = cache / datacache.cache_name(photos, source)
    with open(cache / f".{path.name}.lock", "a") as lock, ThreadPoolExecutor(1) as pool:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run, building
        second = pool.submit(datacache.mapped_pairs, paths, hr_dir=photos, scale=4, degradation="pil",
                             cache_dir=cache, num_threads=1, quiet=False)
        time.sleep(0.5)
        assert not second.done()
        datacache.build(path, paths, source, hr_dir=photos, num_threads=1, quiet=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        second.result(timeout=10)
    out = capsys.readouterr().out
    assert f"data cache: waiting for another process building {cache}" in out
    assert f"data cache: reusing {path}" in out and "data cache: built" not in out


def test_a_cache_made_from_other_images_under_this_name_is_built_again(photos, tmp_path, capsys):
    other = make_images(tmp_path / "other")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(other / "img0.png")
    cache = tmp_path / "cache"
    dataset(other, cache)
    name = datacache.cache_name(photos, again_source(photos))
    shutil.copy(cache / cache_files(cache)[0], cache / name)  # e.g. copied from another machine by hand
    capsys.readouterr()
    data = dataset(photos, cache)
    assert f"{cache / name}: made from other files than these, not used: building it again" in capsys.readouterr().err
    assert np.array_equal(data.hr[0], images.load_rgb(photos / "img0.png")[:64, :80])


def test_a_file_of_another_kind_under_the_cache_name_is_refused_and_kept(photos, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / datacache.cache_name(photos, again_source(photos))
    path.write_bytes(b"a user's own file")
    code, _, err = run_main(train, *one_epoch_on(photos, tmp_path, "--data_cache", cache))
    assert_one_line_error(code, err, f"{path}: not a ResShuffle data cache", "--data_cache")
    assert path.read_bytes() == b"a user's own file"


@pytest.mark.parametrize("where, needle", [("file", "is a file, not a folder"),
                                           ("below a file", "cannot create the data cache folder")])
def test_a_cache_folder_that_cannot_be_made_is_one_line(photos, tmp_path, where, needle):
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "file" if where == "file" else tmp_path / "file" / "cache"
    code, _, err = run_main(train, *one_epoch_on(photos, tmp_path, "--data_cache", folder))
    assert_one_line_error(code, err, str(folder), needle, "--data_cache")


def test_a_disk_without_room_for_the_cache_is_refused_before_decoding(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(datacache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 40_000))
    monkeypatch.setattr(images, "load_rgb", lambda path: pytest.fail("decoded"))
    with pytest.raises(UserError, match=r"the data cache needs 0.1 MB, and 0.0 MB is free: .* --data_cache none"):
        dataset(photos, tmp_path / "cache")
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.slow
def test_a_full_disk_while_building_is_one_line_and_leaves_no_cache(photos, tmp_path):
    cache = tmp_path / "cache"
    result = run_with_file_size_limit(one_epoch_on(photos, tmp_path, "--data_cache", cache), 20_000)
    assert_one_line_error(result.returncode, result.stderr, ".cache: could not be written", "nothing was written")
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no temporary either


def test_the_default_cache_is_in_the_per_user_cache_folder(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    code, out, err = run_main(train, *one_epoch_on(photos, tmp_path, "--run_name", "default"))
    assert code == 0, err
    folder = tmp_path / "xdg" / "resshuffle" / "data"
    assert f"data cache: built {folder / cache_files(folder)[0]}" in out
    code, out, err = run_main(train, *one_epoch_on(photos, tmp_path, "--run_name", "none", "--data_cache", "none"))
    assert code == 0 and "data cache" not in out, err


def test_a_changed_degradation_function_gives_another_cache(photos, monkeypatch):
    before = datacache.cache_name(photos, again_source(photos))

    def sharper(img, scale):
        return img[::scale, ::scale]

    monkeypatch.setitem(datacache.resize.DEGRADATIONS, "pil", sharper)
    assert datacache.cache_name(photos, again_source(photos)) != before
    monkeypatch.setitem(datacache.resize.DEGRADATIONS, "pil", np.ascontiguousarray)  # no Python source
    assert datacache.cache_name(photos, again_source(photos)) != before


def test_a_waiting_process_stops_where_the_first_built_from_other_file_times(photos, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    dataset(photos, cache)  # the machine's first process, which looked at the folder first
    stat = (photos / "img0.png").stat()
    os.utime(photos / "img0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched in between
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="its images changed while the run started"):
        datacache.mapped_pairs(images.list_images(photos), hr_dir=photos, scale=4, degradation="pil", cache_dir=cache,
                               num_threads=1, quiet=True)


@pytest.mark.parametrize("kind", ["folder", "fifo", "dangling link"])
def test_something_else_under_the_cache_name_is_refused_in_one_line_and_left_alone(photos, tmp_path, kind):
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / datacache.cache_name(photos, again_source(photos))
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it would wait for a writer forever
    else:
        path.symlink_to(tmp_path / "nowhere")
    code, _, err = run_main(train, *one_epoch_on(photos, tmp_path, "--data_cache", cache))
    what = {"folder": "a folder", "fifo": "not a regular file", "dangling link": "a link"}[kind]
    assert_one_line_error(code, err, f"{path}: {what}, not a data cache train.py made")
    assert path.is_symlink() if kind == "dangling link" else path.exists()


@pytest.mark.parametrize("flag, code, needle", [("", 2, "--data_cache: empty"),
                                                ("~nosuchuser_x/c", 1, "~nosuchuser_x/c")])
def test_a_data_cache_flag_that_names_no_folder_is_one_line(image_dir, tmp_path, flag, code, needle):
    got, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir,
                           "--checkpoint_dir", tmp_path / "runs", "--data_cache", flag, "--num_epochs", "1", *TINY_RUN)
    assert got == code and len([line for line in err.splitlines() if "error" in line]) == 1, err
    assert needle in err and "Traceback" not in err


def test_the_old_cache_of_a_changed_folder_goes_before_the_new_one_is_built(photos, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    dataset(photos, cache)
    [old] = cache_files(cache)
    stat = (photos / "img1.png").stat()
    os.utime(photos / "img1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    room_checked = []
    monkeypatch.setattr(datacache, "check_room", lambda *a: room_checked.append((cache / old).exists()))
    dataset(photos, cache)
    assert room_checked == [False]  # its room counts as free when the new one's is measured


def test_a_resumed_run_uses_this_machines_cache_folder_unless_one_is_typed(image_dir, tmp_path, monkeypatch):
    runs, typed = tmp_path / "runs", tmp_path / "typed"
    code, out, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", runs,
                              "--run_name", "r", "--data_cache", typed, "--num_epochs", "1", *TINY_RUN)
    assert code == 0 and f"data cache: built {typed}" in out, err
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # another machine's default
    code, out, err = run_main(train, "--resume", runs / "r" / "last.pt", "--num_epochs", "2")
    assert code == 0 and f"data cache: built {tmp_path / 'xdg' / 'resshuffle' / 'data'}" in out, err


@pytest.mark.parametrize("home", ["unknown", "missing"])
def test_without_a_home_folder_the_default_cache_is_in_the_temporary_folder(monkeypatch, tmp_path, home):
    monkeypatch.delenv("XDG_CACHE_HOME")
    if home == "unknown":  # HOME unset and no passwd entry: pathlib raises
        monkeypatch.setattr(datacache.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(
            RuntimeError("Could not determine home directory."))))
    else:
        monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))
    folder = datacache.default_cache_dir()
    assert folder.parent.parent == Path(tempfile.gettempdir()) and folder.parent.name.startswith("resshuffle-")


# HOME unset, and then also no passwd entry for the user (a container's uid): pathlib raises.
NO_PASSWD = "import pwd, runpy, sys; pwd.getpwuid = lambda uid: {}[uid]; sys.argv = ['train.py', '--help']; " \
            "runpy.run_path('train.py', run_name='__main__')"


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["train.py", "--help"], ["-c", NO_PASSWD]], ids=["no HOME", "no passwd entry"])
def test_train_help_works_without_a_home_folder(argv):
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME")}
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "--data_cache" in result.stdout


def test_a_cache_folder_under_the_temporary_folder_made_by_another_user_is_refused(photos, tmp_path):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    if Path(tempfile.gettempdir()).resolve() not in tmp_path.resolve().parents:
        pytest.skip("pytest's folders are not under the temporary folder here")
    squatted = tmp_path / "resshuffle-0"  # made first by someone else, as the default's fallback could be
    squatted.mkdir()
    os.chown(squatted, 65534, 65534)
    with pytest.raises(UserError, match="made by another user"):
        dataset(photos, squatted / "data")


@pytest.fixture
def default_cache(tmp_path, monkeypatch):
    """The default cache folder, empty, with a cache in it of tmp_path/gone, a folder since deleted."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gone = make_images(tmp_path / "gone")
    dataset(gone, datacache.default_cache_dir(), quiet=True)  # dropped at once: nobody maps it now
    shutil.rmtree(gone)
    return datacache.default_cache_dir()


def test_caches_of_folders_that_no_longer_exist_are_pruned_from_the_default_folder(photos, default_cache, capsys):
    [old] = cache_files(default_cache)
    dataset(photos, default_cache)
    out = capsys.readouterr().out
    assert cache_files(default_cache) != [old] and old not in cache_files(default_cache)
    assert not (default_cache / f".{old}.lock").exists()
    [line] = [line for line in out.splitlines() if "no longer exist" in line]
    assert line.startswith("data cache: removed 1 cache made from folders that no longer exist (")
    assert line.endswith(f"): {photos.parent / 'gone'}")


def test_a_cache_in_use_or_being_built_is_not_pruned(photos, default_cache, capsys):
    fcntl = pytest.importorskip("fcntl")
    [old] = cache_files(default_cache)
    with open(default_cache / old, "rb") as using:  # another process mapping it holds this
        fcntl.flock(using, fcntl.LOCK_SH)
        dataset(photos, default_cache)
    assert old in cache_files(default_cache)
    with open(default_cache / f".{old}.lock", "rb") as building:
        fcntl.flock(building, fcntl.LOCK_EX)
        dataset(photos, default_cache)
    assert old in cache_files(default_cache)
    assert "no longer exist" not in capsys.readouterr().out
    dataset(photos, default_cache)
    assert old not in cache_files(default_cache)


def test_a_mapped_cache_is_held_while_its_images_are_in_use(photos, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    data = dataset(photos, tmp_path / "cache")
    [path] = [tmp_path / "cache" / name for name in cache_files(tmp_path / "cache")]
    with open(path, "rb") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    del data
    gc.collect()
    with open(path, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_typed_cache_folder_is_not_pruned(photos, tmp_path):
    gone, cache = make_images(tmp_path / "gone"), tmp_path / "cache"
    dataset(gone, cache)
    shutil.rmtree(gone)
    dataset(photos, cache)  # another machine sharing this folder may see `gone` where this one doesn't
    assert len(cache_files(cache)) == 2
