"""Download DIV2K's HR sets: resumable, checked against pinned SHA-256s, extracted whole or not at all.

usage: python download.py [--root data] [--sets DIV2K_train_HR DIV2K_valid_HR] [--url_base URL] [--keep_zip]

Writes data/DIV2K_train_HR/ (800 images) and data/DIV2K_valid_HR/ (100 images), the default
--train_dir, --val_dir and --data_dir of train.py and evaluate.py.
"""
import argparse
import hashlib
import http.client
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from machinery.files import made_folder, make_dir
from machinery.images import list_images
from utils import REPO, UserError, make_parser, run_cli

DIV2K_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K"
# name: (zip size in bytes, SHA-256 of the zip, images inside). Sizes and checksums of the
# official zips as tensorflow_datasets pins them (datasets/div2k/checksums.tsv).
DIV2K_FILES = {
    "DIV2K_train_HR": (3_530_603_713, "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335", 800),
    "DIV2K_valid_HR": (448_993_893, "20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc", 100),
}
RETRIES = 5


def fetch(url: str, dest: Path, size: int, sha256: str) -> None:
    """Download `url` to `dest`, resuming `dest`.part across dropped connections and runs.

    The file is renamed to `dest` only once its size and SHA-256 match; a mismatch deletes it.
    """
    part = dest.with_name(dest.name + ".part")
    fresh = not part.exists()
    try:
        fetch_part(url, part, size)
    except BaseException:
        if fresh and part.exists() and not part.stat().st_size:
            part.unlink()  # opened, then nothing came: nothing to resume from, and it would keep --root
        raise
    got, digest = part.stat().st_size, file_sha256(part)
    if got != size or digest != sha256:
        part.unlink()
        raise UserError(f"{url}: corrupt download ({got:,} bytes, SHA-256 {digest[:16]}...; expected {size:,} "
                        f"bytes, {sha256[:16]}...): deleted; run again, or pass another --url_base")
    os.replace(part, dest)


def fetch_part(url: str, part: Path, size: int) -> None:
    """Append to `part` until it holds `size` bytes, retrying what may pass (timeouts, resets, cut-short bodies)."""
    failures, restarted = 0, False
    # delay: no bar for a run that fails before its first byte, so its error stays one line
    with tqdm(total=size, initial=part.stat().st_size if part.exists() else 0, unit="B", unit_scale=True,
              unit_divisor=1024, desc=part.stem, delay=1) as bar:
        while (have := part.stat().st_size if part.exists() else 0) < size:
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    total = (response.headers.get("Content-Range", "").rpartition("/")[2] if response.status == 206
                             else response.headers.get("Content-Length"))
                    if total and total.isdigit() and int(total) != size:
                        raise UserError(f"{url}: the file there is {int(total):,} bytes, not {size:,}: "
                                        f"not the zip expected; try another --url_base")
                    if have and response.status != 206:  # the server sent the whole file: start over
                        bar.reset(total=size)
                    with open(part, "ab" if have and response.status == 206 else "wb") as f:
                        while chunk := response.read(1 << 20):
                            f.write(chunk)
                            bar.update(len(chunk))
                error = "closed early" if part.stat().st_size < size else None
            except urllib.error.HTTPError as e:
                if e.code == 416 and not restarted:  # asked past the end: a .part of something else
                    part.unlink()
                    restarted = True
                    continue
                raise UserError(f"{url}: {e.code} {e.reason}"
                                f"{' (the file there is shorter than DIV2K' + chr(39) + 's)' if e.code == 416 else ''}"
                                ) from None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                if why := unreachable(url, e):
                    raise UserError(why) from None
                error = str(getattr(e, "reason", None) or e) or type(e).__name__  # reset, timed out, cut short
            except OSError as e:
                raise UserError(f"{part}: cannot write ({e.strerror or e})") from None
            if error:
                failures += 1
                have = part.stat().st_size if part.exists() else 0
                if failures > RETRIES:
                    raise UserError(f"{url}: {failures} failed attempts, last: {error}"
                                    f"{f'; run again to resume from {part} ({have:,} bytes)' if have else ''}")
                tqdm.write(f"{part.stem}: {error}; retrying" + (f" from byte {have:,}" if have else ""))
                time.sleep(min(2 ** failures, 30) * RETRY_SLEEP)


RETRY_SLEEP = 1.0  # seconds, times 2, 4, 8, ... (tests set it to 0)


def unreachable(url: str, error: Exception) -> str | None:
    """A one-line reason when `url`'s host cannot be reached at all, None when retrying may help.

    A host name that does not resolve (no network, a typo in --url_base) or a refused connection
    (nothing listens there) stays that way for the minute the retries would take.
    """
    reason = getattr(error, "reason", error)  # urlopen wraps socket errors in URLError.reason
    host = urllib.parse.urlsplit(url).netloc.rpartition("@")[2]  # host[:port], never a password
    if isinstance(reason, socket.gaierror):
        return f"{host}: cannot resolve the host name (no network?): {reason}"
    if isinstance(reason, ConnectionRefusedError):
        return f"{host}: connection refused (is the server up? is --url_base right?): {reason}"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def extract(archive: Path, root: Path, name: str, count: int) -> Path:
    """Unzip `archive` to root/name, whole or not at all: into a hidden folder, then renamed."""
    work = root / f".{name}.extracting"
    shutil.rmtree(work, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                    raise UserError(f"{archive}: refusing the unsafe member {member!r}")
            z.extractall(work)
        src = work / name if (work / name).is_dir() else work
        found = len(list_images(src))
        if found != count:
            raise UserError(f"{archive}: holds {found} images where {name} has {count}")
        os.replace(src, root / name)
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive}: not a readable zip ({e})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root / name


def download_div2k(root: Path, url_base: str = DIV2K_URL, names=tuple(DIV2K_FILES), keep_zip: bool = False) -> None:
    """Fetch, check and extract DIV2K's HR sets into root/<name>/, skipping those already complete."""
    root = make_dir(root)
    for name in names:
        size, sha256, count = DIV2K_FILES[name]
        target = root / name
        if target.is_dir():
            found = len(list_images(target))
            if found != count:
                raise UserError(f"{target}: {found} of {count} images; delete the folder to download it again")
            print(f"{target}: already there, {count} images")
            continue
        archive = root / f"{name}.zip"
        if not archive.exists():
            fetch(f"{url_base.rstrip('/')}/{name}.zip", archive, size, sha256)
        elif file_sha256(archive) != sha256:
            raise UserError(f"{archive}: checksum mismatch; delete it to download again")
        extract(archive, root, name, count)
        if not keep_zip:
            archive.unlink()
        print(f"{target}: {count} images")


def check_targets(root: Path, names) -> None:
    """Before any download: where each set's folder and zip go holds nothing of another kind."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: is a file, not a folder")
    for name in names:
        for path, folder in ((root / name, True), (root / f"{name}.zip", False)):
            if path.is_symlink() and not path.exists():
                raise UserError(f"{path}: is a link to {os.readlink(path)}, which does not exist; remove it")
            if path.exists() and path.is_dir() != folder:
                raise UserError(f"{path}: is a {'file' if folder else 'folder'}, where the set's "
                                f"{'folder' if folder else 'zip'} goes; move it away")


def main(args):
    try:
        parts = urllib.parse.urlsplit(args.url_base)
        _ = parts.port  # a bad port or IPv6 address raises only when read
    except ValueError as e:
        raise UserError(f"--url_base {args.url_base}: not a valid address ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise UserError(f"--url_base {args.url_base}: not an http:// or https:// address")
    root = Path(args.root)
    check_targets(root, args.sets)
    # A failed first try, Ctrl-C included, or a typo in --root leaves no empty folder; what a run
    # did write (a .part to resume from, an extracted set) stays, and so do its folders.
    with made_folder(root):
        download_div2k(root, url_base=args.url_base, names=args.sets, keep_zip=args.keep_zip)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--root", default=str(REPO / "data"),
                        help="folder to put DIV2K_train_HR/ and DIV2K_valid_HR/ in")
    parser.add_argument("--url_base", default=DIV2K_URL, help="where the zips are (a mirror of the official site)")
    parser.add_argument("--sets", nargs="+", choices=list(DIV2K_FILES), default=list(DIV2K_FILES),
                        help="which sets to get")
    parser.add_argument("--keep_zip", action="store_true", help="keep the zips after extracting them")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
