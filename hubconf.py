"""torch.hub entry point: the network, with the shipped weights, from a clone and without a network.

    import torch
    net = torch.hub.load("path/to/ResShuffle", "resshuffle", scale=4, pretrained=True, source="local")
    sr = net(lr)  # (N, 3, H, W) in [0, 1] -> (N, 3, 4H, 4W); upscale.upscale tiles large images
"""
import torch

from checkpoint import SHIPPED_SCALES, load_model, shipped_checkpoint, shipped_names
from model import UPSAMPLE_STAGES, ResShuffle

dependencies = ["torch", "safetensors"]


def resshuffle(scale: int = 4, pretrained: bool = True, **model_args) -> ResShuffle:
    """ResShuffle. pretrained: the shipped checkpoint's weights for `scale`, in eval mode, on
    the CPU; otherwise a new network, `model_args` as model.ResShuffle takes them."""
    if not pretrained or scale not in UPSAMPLE_STAGES:  # the network says what scales it has
        return ResShuffle(scale=scale, **model_args)
    if scale not in SHIPPED_SCALES:
        raise ValueError(f"pretrained weights ship for {shipped_names()}, not x{scale}; pass pretrained=False")
    model, info = load_model(shipped_checkpoint(scale), torch.device("cpu"))
    if any(info["model_args"].get(k) != v for k, v in model_args.items()):
        raise ValueError(f"the shipped x{scale} network is {info['model_args']}; "
                         f"pass pretrained=False for other model_args")
    return model
