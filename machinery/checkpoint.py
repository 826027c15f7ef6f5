"""Checkpoints: one dict of state dicts and plain data, written atomically, loaded without running code.

Two file formats hold it: torch.save's (.pt, loaded with weights_only=True) and, for weights,
safetensors (.safetensors: tensors plus JSON metadata, no pickle at all).
"""
import contextlib
import errno
import json
import math
import pickle
import re
import struct
import warnings
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from model import DEFAULT_ARCH, NETWORKS, build_network, network_options
from utils import REPO, UserError, first_line, shown

from .fast import build_fast_network
from .files import atomic_path, check_output_file, file_ids, make_dir, not_a_file
from .onnx_export import export_onnx, require_onnx

# The shipped checkpoints, by network and scale, in checkpoints/ of the repository wherever the scripts run.
SHIPPED = {"resshuffle": (2, 3, 4), "edsr_baseline": (4,), "espcn": (4,)}
# Those trained on real inputs (train.py --degradation real: blur, noise and JPEG), for phone and web
# photos; --real picks them, named <arch>_real_x<scale>.
SHIPPED_REAL = {"resshuffle": (4,)}


def shipped_checkpoint(scale: int, arch: str = DEFAULT_ARCH, real: bool = False) -> Path:
    return REPO / "checkpoints" / f"{arch}{'_real' if real else ''}_x{scale}.safetensors"


def shipped_names(arch: str | None = DEFAULT_ARCH, real: bool = False) -> str:
    """"x2, x3, x4": the shipped scales of a network, as help and errors name them; with arch None,
    every shipped checkpoint ("resshuffle x2, x3, x4; espcn x4; ..."). `real`: those of SHIPPED_REAL."""
    table = SHIPPED_REAL if real else SHIPPED
    if arch is None:
        return "; ".join(f"{a} {shipped_names(a, real)}" for a in table)
    return ", ".join(f"x{s}" for s in table.get(arch, ())) or "none"


def shipped_paths() -> list[Path]:
    return [shipped_checkpoint(s, a, real) for real, table in ((False, SHIPPED), (True, SHIPPED_REAL))
            for a, scales in table.items() for s in scales]


# --export's formats, by the output's suffix.
EXPORT_SUFFIXES = (".safetensors", ".pt", ".pth", ".onnx")

# What a weights-only checkpoint (--export, the shipped one) keeps of a run's checkpoint.
WEIGHT_KEYS = ("model", "ema", "model_args", "degradation", "training")


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, rename: a kill never leaves a torn checkpoint."""
    with atomic_path(Path(path)) as tmp:
        try:
            torch.save(checkpoint, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) so
            detail = first_line(e).split("] ")[-1].lstrip(". ")
            raise OSError(errno.EIO, f"the write failed: {detail}") from None  # atomic_path: one line, old file kept


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint dict with weights_only=True: a file that would run code is refused."""
    path = Path(path)
    if path.is_dir() and (path / "last.pt").is_file():
        raise UserError(f"{path}: is a run's folder; name its checkpoint: {path / 'last.pt'}")
    kind = not_a_file(path)
    if kind:  # never opened: a FIFO would wait for a writer for ever
        raise UserError(f"{path}: {kind}, not a regular file: a checkpoint is read from a file")
    if not path.is_file() and path in shipped_paths():
        raise UserError(f"no checkpoint at {path}: restore the shipped one with `git -C {REPO} checkout -- "
                        f"checkpoints/{path.name}`, or pass one of yours with --checkpoint")
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    with open(path, "rb") as f:
        magic = f.read(9)
    if is_safetensors(magic):
        return load_safetensors(path)
    if path.suffix.lower() == ".onnx" and not magic.startswith(b"PK\x03\x04"):
        raise UserError(f"{path}: an ONNX export, which onnxruntime runs (docs/formats.md); infer.py and "
                        f"evaluate.py load the .safetensors or .pt it was exported from")
    # torch.save writes a zip (PK..); the legacy format and plain pickles start with PROTO (0x80)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise UserError(f"{path}: not a PyTorch checkpoint (neither a zip, a pickle nor a safetensors file)")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ..." for plain pickles
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:  # a file object: torch.load reads a path named .safetensors as one
                checkpoint = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused: {weights_only_reason(e)}") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... here
        raise UserError(f"{path}: not a loadable checkpoint ({first_line(e)})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise UserError(f"{path}: not a ResShuffle checkpoint (no 'model' and 'model_args' entries)")
    return checkpoint


def checkpoint_for(checkpoint: str | None, scale: int | None, arch: str | None = None, real: bool = False) -> Path:
    """The file infer.py and evaluate.py load: --checkpoint where given, else the shipped one for
    --arch (resshuffle without it), --scale (x4 without it) and --real (trained on real inputs)."""
    if checkpoint is not None:
        if real:
            raise UserError("--real picks a shipped checkpoint: leave it out beside --checkpoint")
        return Path(checkpoint)
    arch, scale = arch or DEFAULT_ARCH, scale or 4
    if scale not in (SHIPPED_REAL if real else SHIPPED).get(arch, ()):
        kind, flag = ("real-input ", " --degradation real") if real else ("", "")  # and pass it without --real
        raise UserError(f"no {kind}{arch} x{scale} checkpoint is shipped (shipped: {shipped_names(None, real)}): "
                        f"train one with `python train.py --arch {arch} --upscale_factor {scale}{flag}` and pass it "
                        f"with --checkpoint")
    return shipped_checkpoint(scale, arch, real)


def load_chosen(checkpoint: str | None, scale: int | None, device: torch.device, raw_weights: bool = False,
                arch: str | None = None, real: bool = False) -> tuple[torch.nn.Module, dict, Path]:
    """infer.py's and evaluate.py's `load_model`: the file `checkpoint_for` picks, and that file.
    A named checkpoint decides the network; a --scale or --arch given beside it must agree."""
    path = checkpoint_for(checkpoint, scale, arch, real)
    model, info = load_model(path, device, raw_weights=raw_weights)
    if scale is not None and model.scale != scale:
        raise UserError(f"{path} is an x{model.scale} checkpoint, not x{scale}: leave out --scale, "
                        f"or name an x{scale} checkpoint")
    if arch is not None and info["arch"] != arch:
        raise UserError(f"{path} holds a {info['arch']} network, not {arch}: leave out --arch, "
                        f"or name a {arch} checkpoint")
    return model, info, path


def is_safetensors(head: bytes) -> bool:
    """Whether a file's first 9 bytes open a safetensors file: a little-endian header length,
    then the JSON header's '{'."""
    return len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100_000_000


def save_safetensors(checkpoint: dict, path: Path) -> None:
    """The weights (`model.*`, and `ema.*` where the run kept them) with model_args and the
    degradation as JSON metadata, written atomically."""
    tensors = {f"{kind}.{k}": v.contiguous()
               for kind in ("model", "ema") for k, v in (checkpoint.get(kind) or {}).items()}
    metadata = {"format": "resshuffle", "model_args": json.dumps(checkpoint["model_args"]),
                "degradation": json.dumps(checkpoint.get("degradation")),
                "training": json.dumps(checkpoint.get("training"))}
    data = safetensors.torch.save(tensors, metadata=metadata)  # bytes: save_file would write its own temporary
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def load_safetensors(path: Path) -> dict:
    """A .safetensors export as the dict a weights-only .pt holds (model, ema, model_args, degradation)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model_args, degradation = json.loads(metadata["model_args"]), json.loads(metadata.get("degradation", "null"))
        training = json.loads(metadata.get("training", "null"))
    except (KeyError, ValueError, TypeError, OSError, RecursionError, safetensors.SafetensorError) as e:
        why = first_line(e) if str(e) else "no model_args"
        raise UserError(f"{path}: not a ResShuffle safetensors file ({why})") from None
    state = {kind: {k[len(kind) + 1:]: v for k, v in tensors.items() if k.startswith(kind + ".")}
             for kind in ("model", "ema")}
    if not state["model"] or not isinstance(model_args, dict):
        raise UserError(f"{path}: not a ResShuffle safetensors file (no model weights or model_args)")
    return {"model": state["model"], "ema": state["ema"] or None, "model_args": model_args, "degradation": degradation,
            "training": training}


def weights_only_reason(e: pickle.UnpicklingError) -> str:
    """torch's weights_only refusal, without its advice to retry with weights_only=False.

    torch gives the refused global only inside its message text, so it is read from there.
    """
    found = re.search(r"Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+|Unsupported operand \d+", str(e))
    detail = found.group(0) if found else ""
    return ("it holds objects that weights_only=True loading does not allow, which could run code"
            + (f" ({detail})" if detail else ""))


def load_model(path: str | Path, device: torch.device, raw_weights: bool = False) -> tuple[torch.nn.Module, dict]:
    """The network a checkpoint describes, with its weights, in eval mode and channels_last.

    A checkpoint trained with --ema holds two sets: the EMA weights are used unless
    `raw_weights`. Returns (model, info); info: `weights` ("ema" or "raw"), `degradation`
    (what it was trained on, None if the checkpoint does not say), `model_args`.
    """
    return model_from(load_checkpoint(path), path, device, raw_weights)


def model_from(checkpoint: dict, path: str | Path, device: torch.device,
               raw_weights: bool = False) -> tuple[torch.nn.Module, dict]:
    """`load_model` for a checkpoint dict already loaded from `path`."""
    kind = "ema" if checkpoint.get("ema") is not None and not raw_weights else "raw"
    state, model_args = checkpoint["ema"] if kind == "ema" else checkpoint["model"], checkpoint["model_args"]
    model = network_for(state, model_args, path)
    broken = next((name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken:  # a diverged run's: the output would be black
        raise UserError(f"{path}: its weights hold NaN or inf values ({broken}); it can't upscale anything")
    model.load_state_dict(state)
    info = {"weights": kind, "degradation": checkpoint.get("degradation"), "model_args": model_args,
            "arch": model_args.get("arch", DEFAULT_ARCH), "training": checkpoint.get("training")}
    return model.to(device, memory_format=torch.channels_last).eval(), info


# A dry run stops where the network outgrows what the weights could build: twice their values
# (tied or reparametrized weights count twice) and 8 modules per tensor (activations, containers),
# plus room for the first mismatch to be named exactly where the sizes are near.
SLACK_PARAMETERS, SLACK_MODULES = 100_000, 1_000


def network_for(state, model_args, path) -> torch.nn.Module:
    """The network `model_args` describe, built only once its names and shapes are found to match
    the weights `state`: first built on the meta device (allocating nothing), stopped early where
    it outgrows the weights, as a small file claiming num_residuals 100,000 would (minutes and
    gigabytes to build for real)."""
    check_model_args(model_args, path)
    tensors = [t for t in state.values() if isinstance(t, torch.Tensor)] if isinstance(state, dict) else []
    held = sum(t.numel() for t in tensors)
    too_large = f"{path}: its model_args {model_args} describe a network far larger than the {held:,} weights it holds"
    try:
        with at_most(2 * held + SLACK_PARAMETERS, 8 * len(tensors) + SLACK_MODULES, too_large), torch.device("meta"):
            mismatch = weights_mismatch(build_network(model_args).state_dict(), state)
    except (TypeError, ValueError, RuntimeError) as e:  # nothing is allocated on meta: an error is the options'
        raise UserError(f"{path}: its model_args {model_args} do not describe a network ({first_line(e)})") from None
    if mismatch:
        raise UserError(f"{path}: its weights do not match its model_args {model_args}: {mismatch}")
    return build_fast_network(model_args)


def check_model_args(model_args, path) -> None:
    """model_args are names with plain values, and each option of the network has its default's
    type: a bool ("no" would be true), an int (8.0 or "8" builds nothing), a float (an int will do).
    A UserError naming the key, its value and the type expected."""
    if not isinstance(model_args, dict) or not all(isinstance(v, (str, int, float, bool, type(None)))
                                                  for v in model_args.values()):
        raise UserError(f"{shown(path)}: its model_args are not a network's options (names with plain values)")
    arch = model_args.get("arch", DEFAULT_ARCH)
    if not isinstance(arch, str) or arch not in NETWORKS:
        return  # build_network names an unknown network
    for key, default in ({"scale": 4} | network_options(arch)).items():
        value = model_args.get(key, default)
        if isinstance(default, bool) and not isinstance(value, bool):
            expected = "a boolean (true or false)"
        elif isinstance(default, int) and not isinstance(default, bool) and (type(value) is not int):
            expected = "an integer"
        elif isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            expected = "a number"
        else:
            continue
        raise UserError(f"{shown(path)}: its model_args {key} is {shown(repr(value))}: {key} takes {expected}")


@contextlib.contextmanager
def at_most(parameters: int, modules: int, message: str):
    """A UserError(`message`) as soon as the networks built inside hold more than `parameters`
    values or `modules` modules."""
    built = [0, 0]

    def count(kind: int, numel: int) -> None:
        built[kind] += numel
        if built[0] > parameters or built[1] > modules:
            raise UserError(message)
    hooks = (torch.nn.modules.module.register_module_parameter_registration_hook(
                 lambda module, name, param: count(0, param.numel() if param is not None else 0)),
             torch.nn.modules.module.register_module_module_registration_hook(
                 lambda module, name, submodule: count(1, 1)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def weights_mismatch(expected: dict, state) -> str | None:
    """The first difference between a network's state_dict and a checkpoint's weights, in words;
    None where every name and shape agrees."""
    if not isinstance(state, dict):
        return f"they are a {type(state).__name__}, not a dict of tensors"
    for name, tensor in expected.items():
        if name not in state:
            return f"{name} (shape {tuple(tensor.shape)}) is missing"
        if not isinstance(state[name], torch.Tensor) or state[name].shape != tensor.shape:
            found = tuple(state[name].shape) if isinstance(state[name], torch.Tensor) else type(state[name]).__name__
            return f"{name} is {found}, the network's is {tuple(tensor.shape)}"
        if tensor.is_floating_point() and not state[name].is_floating_point():  # cast silently otherwise
            return f"{name} is {state[name].dtype}, not real numbers in floating point"
    extra = [name for name in state if name not in expected]
    return f"{extra[0]} is not in the network" if extra else None


def export_weights(src: str | Path, dst: str | Path, overwrite: bool = False, summary=None) -> None:
    """Write a run's checkpoint as weights and model_args only: what infer.py and evaluate.py need.

    The format follows `dst`'s suffix: .safetensors, .onnx (the network, dynamic axes), else torch.save's.

    Never over a run's checkpoint (its optimizer state would be lost), and over an existing
    export only with `overwrite`. `summary(checkpoint, log_path)`: what the export keeps of a
    run's training (runs.training_summary).
    """
    checkpoint = load_checkpoint(src)
    if Path(dst).exists() and file_ids([dst]) & file_ids([src]):
        raise UserError(f"{dst}: is the checkpoint being exported; choose another output name")
    if is_run_checkpoint(dst):
        raise UserError(f"{dst}: is a run's checkpoint (with its optimizer state); an export never replaces one")
    if Path(dst).suffix.lower() not in EXPORT_SUFFIXES:
        raise UserError(f"{dst}: the export's format comes from its suffix: {', '.join(EXPORT_SUFFIXES)}")
    check_output_file(dst, overwrite=overwrite)
    if Path(dst).suffix.lower() == ".onnx":
        require_onnx()  # before any folder is made
    make_dir(Path(dst).parent)
    keep = {k: checkpoint[k] for k in WEIGHT_KEYS if checkpoint.get(k) is not None}
    if "optimizer" in checkpoint and summary is not None:  # a run's checkpoint: how it trained
        keep["training"] = summary(checkpoint, Path(src).parent / "log.csv")
    what, suffix = ", ".join(keep), Path(dst).suffix.lower()
    if suffix == ".safetensors":
        save_safetensors(keep, Path(dst))
    elif suffix == ".onnx":  # one network: the EMA weights where the run kept them, as infer.py uses
        model, info = model_from(checkpoint, src, torch.device("cpu"))
        export_onnx(model, Path(dst), {"model_args": info["model_args"], "weights": info["weights"],
                                       "degradation": info["degradation"]})
        what = f"the network with its {info['weights']} weights, any batch, height and width"
    else:
        save_checkpoint(keep, dst)
    print(f"{shown(src)} ({describe_progress(checkpoint)}) -> {shown(dst)}: {what}; "
          f"model_args {shown(checkpoint['model_args'])}")


def is_run_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a training run's checkpoint (one --resume can continue)."""
    try:
        return Path(path).is_file() and "optimizer" in load_checkpoint(path)
    except UserError:  # not a checkpoint at all
        return False


def describe_progress(checkpoint: dict) -> str:
    """'epoch 30, best val PSNR 29.6133 dB at epoch 28' for a run's checkpoint; 'weights only' for an export."""
    if "epoch" not in checkpoint:
        return "weights only"
    best = checkpoint.get("best_psnr", -math.inf)
    return f"epoch {checkpoint['epoch']}" + (f", best val PSNR {best:.4f} dB at epoch {checkpoint.get('best_epoch')}"
                                             if math.isfinite(best) else ", not validated yet")
