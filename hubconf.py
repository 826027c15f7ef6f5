"""torch.hub entry points: the networks, with the shipped weights, from a clone and without a network.

    import torch
    net = torch.hub.load("path/to/ResShuffle", "resshuffle", scale=4, pretrained=True, source="local")
    net = torch.hub.load("path/to/ResShuffle", "resshuffle", real=True, source="local")  # for JPEGs from phones
    net = torch.hub.load("path/to/ResShuffle", "network", arch="espcn", scale=4, source="local")
    net = torch.hub.load("path/to/ResShuffle", "from_checkpoint", path="my_run/best.pt", source="local")
    sr = net(lr)  # (N, 3, H, W) in [0, 1] -> (N, 3, 4H, 4W) in [0, 1]; machinery.upscale.upscale tiles large images

The networks overshoot at sharp edges (the x4 shipped before 2026-12-07 gave -0.06 to 1.02 on photos), and
`to_pil_image` or `mul(255).byte()` would wrap such values round (just below 0 to near 255). So each network
returned here clamps its output to [0, 1] in eval mode (a forward hook: the class, state_dict keys
and parameters are the network's own). In train mode, as a new network starts, the output is left
as it is, so that the loss's gradient reaches every pixel.

This repository's modules have plain names (utils, model, ...) that a caller may use for its own
modules. So they are imported here under private names, `_resshuffle_hub_<clone>.<name>`: the caller's
sys.modules gains none of the plain names, and modules of the caller's that have them are
neither used nor replaced. Where the caller already imported this repository's own module
of a name (its tests do), that one is used.

The networks come in the form the scripts run (machinery/fast.py): ResShuffle's `tail` is a
SubpixelConv that includes the last PixelShuffle, with the same weights and state_dict;
`model.build_network` gives them as model.py draws them.
"""
import hashlib
import importlib
import sys
from pathlib import Path

dependencies = ["torch", "safetensors"]

HERE = Path(__file__).resolve().parent
# One private prefix per clone: two clones loaded in one process keep their own code.
PACKAGE = "machinery"  # the package folder beside the top-level modules
PRIVATE = f"_resshuffle_hub_{hashlib.sha256(str(HERE).encode()).hexdigest()[:12]}"


def _repo(name: str):
    """This repository's module `name`, imported with everything it imports of the repository,
    without leaving a plain name in sys.modules that the caller did not put there."""
    names = [p.stem for p in HERE.glob("*.py") if p.stem != "hubconf"] + [PACKAGE]
    names += [f"{PACKAGE}.{p.stem}" for p in (HERE / PACKAGE).glob("*.py") if p.stem != "__init__"]
    callers = {n: sys.modules.pop(n) for n in names if n in sys.modules and not _ours(sys.modules[n])}
    already = {n for n in names if n in sys.modules}  # this repository's, imported by the caller
    for n in names:  # what an earlier load imported privately is imported once
        if f"{PRIVATE}.{n}" in sys.modules and n not in already:
            sys.modules[n] = sys.modules[f"{PRIVATE}.{n}"]
    sys.path.insert(0, str(HERE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(HERE))
        for n in names:
            if n in sys.modules and n not in already:
                sys.modules[f"{PRIVATE}.{n}"] = sys.modules.pop(n)
        sys.modules.update(callers)


def _ours(module) -> bool:
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().parent in (HERE, HERE / PACKAGE)


def _clamp_in_eval(module, args, output):
    """A forward hook: the output in [0, 1], as images hold them, where the network is used (eval mode)."""
    return output if module.training else output.clamp(0, 1)


def _clamped(net):
    net.register_forward_hook(_clamp_in_eval)
    return net


def network(arch: str = "resshuffle", scale: int = 4, pretrained: bool = True, real: bool = False, **model_args):
    """A network of model.NETWORKS, its output clamped to [0, 1] in eval mode. pretrained: the shipped
    checkpoint's weights for `arch` and `scale`, in eval mode, on the CPU (`model_args` must then be
    the shipped ones, or left out), with `real` the one trained on real inputs (blur, noise, JPEG:
    phone and web photos); otherwise a new network, `model_args` as its class takes them."""
    if not isinstance(scale, int) or isinstance(scale, bool):
        raise ValueError(f"scale must be an int (2, 3, 4 or 8), got {type(scale).__name__} {scale!r}")
    checkpoint = _repo(f"{PACKAGE}.checkpoint")
    if real and not pretrained:
        raise ValueError("real=True picks the shipped weights for real photos: it goes with pretrained=True")
    if not pretrained:
        return _clamped(_repo(f"{PACKAGE}.fast").build_fast_network({"arch": arch, "scale": scale, **model_args}))
    if scale not in (checkpoint.SHIPPED_REAL if real else checkpoint.SHIPPED).get(arch, ()):
        kind = "real-input " if real else ""
        raise ValueError(f"{kind}pretrained weights ship for {checkpoint.shipped_names(None, real)}, not {arch} "
                         f"x{scale}; pass pretrained=False")
    net, info = checkpoint.load_model(checkpoint.shipped_checkpoint(scale, arch, real), _cpu())
    if any(info["model_args"].get(k) != v for k, v in model_args.items()):
        raise ValueError(f"the shipped {'real-input ' if real else ''}{arch} x{scale} network is {info['model_args']}; "
                         f"pass pretrained=False for other model_args")
    return _clamped(net)


def from_checkpoint(path: str, raw_weights: bool = False):
    """The network any checkpoint (.pt or .safetensors, a run's or an export) describes, with its
    weights (the EMA ones where it has them, unless `raw_weights`), in eval mode, on the CPU, its
    output clamped to [0, 1]."""
    net, _ = _repo(f"{PACKAGE}.checkpoint").load_model(path, _cpu(), raw_weights=raw_weights)
    return _clamped(net)


def resshuffle(scale: int = 4, pretrained: bool = True, real: bool = False, **model_args):
    """ResShuffle: `network` with arch "resshuffle"; `real`: the weights for real photos (x4)."""
    return network("resshuffle", scale, pretrained, real, **model_args)


def edsr_baseline(scale: int = 4, pretrained: bool = True, **model_args):
    """EDSR-baseline (Lim et al. 2017): `network` with arch "edsr_baseline"."""
    return network("edsr_baseline", scale, pretrained, **model_args)


def espcn(scale: int = 4, pretrained: bool = True, **model_args):
    """ESPCN (Shi et al. 2016): `network` with arch "espcn"."""
    return network("espcn", scale, pretrained, **model_args)


def _cpu():
    import torch
    return torch.device("cpu")
