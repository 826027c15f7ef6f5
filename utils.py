"""What every script shares: one-line errors, outputs written whole or not at all, flag types, device and seed."""
import argparse
import contextlib
import math
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


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
            raise UserError(f"{self.path}: could not be written ({exc.strerror or exc})") from None
        return False


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what `atomic_path` leaves behind when a process is killed mid-write; the paths removed."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def make_dir(path: str | Path) -> Path:
    """mkdir -p, with a one-line error when it can't be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create folder ({e.strerror})") from None
    return path


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


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
