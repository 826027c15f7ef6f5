"""torch.hub entry point: the network, with the shipped weights, from a clone and without a network.

    import torch
    net = torch.hub.load("path/to/ResShuffle", "resshuffle", scale=4, pretrained=True, source="local")
    sr = net(lr)  # (N, 3, H, W) in [0, 1] -> (N, 3, 4H, 4W); upscale.upscale tiles large images
"""
import torch

from checkpoint import SHIPPED_CHECKPOINT, load_model
from model import ResShuffle

dependencies = ["torch", "safetensors"]


def resshuffle(scale: int = 4, pretrained: bool = True, **model_args) -> ResShuffle:
    """ResShuffle. pretrained: the shipped x4 checkpoint's (EMA) weights, in eval mode, on the CPU;
    otherwise a new network, `model_args` as model.ResShuffle takes them."""
    if not pretrained:
        return ResShuffle(scale=scale, **model_args)
    model, info = load_model(SHIPPED_CHECKPOINT, torch.device("cpu"))
    if any(info["model_args"].get(k) != v for k, v in dict(model_args, scale=scale).items()):
        raise ValueError(f"pretrained weights ship for x4 only, the network {info['model_args']}; "
                         f"pass pretrained=False for x{scale} or other model_args")
    return model
