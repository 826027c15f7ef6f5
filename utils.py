"""What every script shares: one-line errors, outputs written whole or not at all, flag types, device and seed."""
import argparse
import contextlib
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


# Default paths (the shipped checkpoint, data/, checkpoints/) are resolved from here, not from
# the current folder, so that the scripts work when run from anywhere.
REPO = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


def run_cli(main, args) -> None:
    """Run a script's main(args); a UserError becomes `prog: error: ...` and exit status 1.

    Running out of memory and Ctrl-C are reported the same way (exit statuses 1 and 130);
    every output is written atomically, so neither leaves a half-written file.
    """
    prog = Path(sys.argv[0]).name
    try:
        main(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"{prog}: error: out of memory ({first_line(e)}): use a smaller --tile (or --batch_size)",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; outputs already written are complete, none is half-written", file=sys.stderr)
        sys.exit(130)


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure. CUDA raises torch.OutOfMemoryError; torch's CPU
    allocator raises a plain RuntimeError, told apart only by its message."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (torch's run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '2 images'; `nouns` where adding an s is wrong ('patches')."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def warn(message: str) -> None:
    """A one-line warning on stderr (not `warnings`, which prints a source line with it)."""
    print(f"{Path(sys.argv[0]).name}: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- files written whole

TMP_SUFFIX = ".tmp"


class atomic_path:
    """Context manager giving a temporary path beside `path`, renamed onto it on success.

    A reader never sees a half-written file: a failure (or a kill) leaves the old file, or none.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> str:
        if not self.path.parent.is_dir():
            raise UserError(f"{self.path.parent}: output folder does not exist")
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder, not a file name")
        try:
            fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TMP_SUFFIX)
        except OSError as e:
            raise UserError(f"{self.path.parent}: cannot write there ({e.strerror})") from None
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
                # mkstemp makes the file 0600; give it the mode a plain open() would have.
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)
                os.replace(self.tmp, self.path)
                return False
            except OSError as e:
                exc = e
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        if isinstance(exc, OSError):  # a full disk, a vanished folder, ...
            kept = "the file there before is unchanged" if self.path.exists() else "nothing was written"
            raise UserError(f"{self.path}: could not be written ({exc.strerror or exc}; "
                            f"{free_space(self.path.parent)}); {kept}") from None
        return False


def free_space(folder: Path) -> str:
    """'12.3 GB free', or 'the disk is full', for error messages about failed writes."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return "the disk is full" if free < 1e6 else f"{free / 1e9:.1f} GB free"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what `atomic_path` leaves behind when a process is killed mid-write; the paths removed."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def check_output_dir(path: str | Path) -> Path:
    """Fail now, before any work, if `path` is not a folder that can be written or made.

    The folder itself is made only when something is written into it (`make_dir`), so that a
    failed run leaves no empty folders. Writing is tried, not inferred from permissions: root
    may write to a 0555 folder, nobody to a read-only mount.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: can't be an output folder: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{existing}: can't write there ({e.strerror})") from None
    return path


def check_output_file(path: str | Path, overwrite: bool = False, inputs=()) -> Path:
    """Fail now, before any work, if writing `path` would replace an input, or an existing file
    without `overwrite`, or can't be done."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a file name")
    if path.exists() and not path.is_file() or path.is_symlink():  # a device, a pipe; a link's target
        raise UserError(f"{path}: is not a regular file; outputs are written only as files")
    if any(same_file(path, p) for p in inputs):
        raise UserError(f"{path}: is an input; outputs never replace inputs: choose another output name")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; pass --overwrite to replace it")
    check_output_dir(path.parent)
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (through links, `..` and case-folding file systems)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def make_dir(path: str | Path) -> Path:
    """mkdir -p, with a one-line error when it can't be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create folder ({e.strerror})") from None
    return path


def lock_folder(folder: Path):
    """An exclusive lock on folder/.lock, held while the returned file is open; a second process
    asking for it gets a one-line error. None where the platform has no flock (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(folder / ".lock", "a")
    except OSError as e:
        raise UserError(f"{folder / '.lock'}: can't be opened as a lock file ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"{folder}: another process is using this folder; wait for it to end, "
                        f"or choose another one") from None
    return f


# ---------------------------------------------------------------- runtime

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    return device


# ---------------------------------------------------------------- argparse types

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed_int(text: str) -> int:
    """A seed numpy accepts: 0 to 2**32 - 1."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in 0 to {2 ** 32 - 1}, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# ---------------------------------------------------------------- argparse help

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser for a script whose docstring is: a summary, a `usage:` paragraph, the rest.

    The usage paragraph becomes argparse's usage (printed once, not twice), the rest the description.
    """
    summary, _, rest = doc.strip().partition("\n\n")
    usage, body = "", rest
    if rest.startswith("usage:"):
        usage, _, body = rest.partition("\n\n")
    return argparse.ArgumentParser(usage=usage.removeprefix("usage:").strip() or None,
                                   description=f"{summary}\n\n{body}".strip(), formatter_class=HelpFormatter)
