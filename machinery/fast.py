"""Faster forms of layers that model.py draws as the papers do: the same computation, the same weights.

    from machinery.fast import build_fast_network
    net = build_fast_network({"arch": "resshuffle", "scale": 4})  # what every script runs

`fast_forms(model)` is the one place they are applied, each where its preconditions hold; the
rest of the network runs as drawn. The parameters stay the same objects under the same names, so
the state_dict, checkpoints and an optimizer built afterwards are those of the drawn network.

1. The sub-pixel tail (ResShuffle): a conv after PixelShuffle(r) runs before the shuffle instead.
   After the shuffle, ResShuffle's 9x9 tail is a 3-channel conv at full resolution, a shape that
   runs at a fraction of a 64->64 conv's FLOP rate on a CPU. Before it, on the r*r-times-deeper
   input, an exactly rearranged kernel (`subpixel_conv_weight`) with r*r*3 outputs runs near the
   convolution peak (benchmark.py's training-step row against the plain network).
2. The channels_last shuffle (every PixelShuffle): on CUDA, F.pixel_shuffle returns NCHW from a
   channels_last input, and the next conv (channels_last weights) copies that full-size map back,
   forward and backward. `ChannelsLastShuffle` keeps it channels_last in one copy, bit for bit.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ResShuffle, build_network

# The networks whose `tail` conv follows their `upsample` stages directly, by exact class: a subclass
# may change what lies between them. EDSR-baseline's 3x3 tail would take four times its FLOPs in
# this form; it runs as drawn.
SUBPIXEL_TAIL_NETWORKS = (ResShuffle,)

# Devices whose pixel_shuffle keeps a channels_last input channels_last (PyTorch's CPU kernel does).
CHANNELS_LAST_SHUFFLE_DEVICES = {"cpu"}


def build_fast_network(model_args: dict) -> nn.Module:
    """model.build_network(model_args) in its fast forms: the network every script trains and runs."""
    return fast_forms(build_network(model_args))


def fast_forms(model: nn.Module) -> nn.Module:
    """`model`, changed in place to its fast forms where their preconditions hold; returned."""
    if type(model) in SUBPIXEL_TAIL_NETWORKS and subpixel_tail_fits(model.upsample, model.tail):
        model.upsample, model.tail = model.upsample[:-1], SubpixelConv(model.tail, model.upsample[-1].upscale_factor)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.PixelShuffle:
                setattr(parent, name, ChannelsLastPixelShuffle(child.upscale_factor))
    return model


def subpixel_tail_fits(upsample: nn.Module, tail: nn.Module) -> bool:
    """Whether `tail` after `upsample` can run before upsample's last PixelShuffle: a plain conv
    with a bias (stride 1, no dilation or groups, zero "same" padding of an odd square kernel)
    after a Sequential that ends with PixelShuffle."""
    return (isinstance(upsample, nn.Sequential) and len(upsample) > 0 and type(upsample[-1]) is nn.PixelShuffle
            and type(tail) is nn.Conv2d and tail.bias is not None
            and tail.stride == (1, 1) and tail.dilation == (1, 1) and tail.groups == 1
            and tail.padding_mode == "zeros" and tail.kernel_size[0] == tail.kernel_size[1]
            and tail.kernel_size[0] % 2 == 1 and tail.padding == (tail.kernel_size[0] // 2,) * 2)


class SubpixelConv(nn.Module):
    """A conv that followed PixelShuffle(r), run before it: conv(pixel_shuffle(z)) as
    pixel_shuffle(conv'(z)), conv' the rearranged kernel. It holds the conv's own weight and bias
    (the same Parameters, under the same names)."""

    def __init__(self, conv: nn.Conv2d, r: int):
        super().__init__()
        self.weight, self.bias, self.r = conv.weight, conv.bias, r
        self._cache = None

    def forward(self, z):
        weight, bias = self.rearranged()
        return F.pixel_shuffle(F.conv2d(z, weight, bias, padding=weight.shape[-1] // 2), self.r)

    def rearranged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias for use before PixelShuffle(r).

        Without gradients (inference) the pair is kept until the tensors change (their version
        counters move on every in-place update: optimizer steps, load_state_dict), so tiled
        inference builds it once, not once per tile. It is built outside autocast, in the weight's
        own dtype, so that it serves a bf16 call and a later fp32 one alike (conv2d casts it as
        autocast says, as it would the plain conv's weight).
        """
        w, b, r = self.weight, self.bias, self.r
        if torch.is_grad_enabled() or w.is_inference():  # inference tensors keep no version counter
            return subpixel_conv_weight(w, r), b.repeat_interleave(r * r)
        key = (w.data_ptr(), w._version, b.data_ptr(), b._version, w.dtype, w.device)
        if self._cache is None or self._cache[0] != key:
            # The detached views keep the tensors' memory alive, so no other tensor can take
            # their address and pass for them.
            with torch.autocast(w.device.type, enabled=False):
                self._cache = (key, (w.detach(), b.detach()), subpixel_conv_weight(w, r), b.repeat_interleave(r * r))
        return self._cache[2:]


def subpixel_conv_weight(weight: torch.Tensor, r: int) -> torch.Tensor:
    """The kernel that, applied before PixelShuffle(r), equals `weight` (stride 1, same padding) after it.

    With u = pixel_shuffle(z, r), output pixel (r*I + p, r*J + q) of the conv on u reads
    u[c, r*I + p + dy - k, ...] = z[c*r*r + a*r + b, I + m, ...], where p + dy - k = r*m + a.
    So the conv on u equals pixel_shuffle(conv(z, w2), r), with w2[o*r*r + p*r + q, c*r*r + a*r + b,
    m, n] = weight[o, c, r*m + a - p + k, r*n + b - q + k] (0 where that tap is outside the
    kernel): an exact rearrangement, zero padding included.
    """
    out_ch, in_ch, size, _ = weight.shape
    k = size // 2
    m = torch.arange(-((k + r - 1) // r), (k + r - 1) // r + 1, device=weight.device)
    phase = torch.arange(r, device=weight.device)
    taps = r * m.view(1, 1, -1) + phase.view(1, -1, 1) - phase.view(-1, 1, 1) + k  # [p, a, m]
    # select[p, a, m, d] = 1 where that tap is row d of the kernel; taps outside it select nothing.
    # A product, not indexing: indexing's gradient adds with parallel atomics, in no fixed order.
    select = (taps.unsqueeze(-1) == torch.arange(size, device=weight.device)).to(weight.dtype)
    w2 = torch.einsum("pamy,qbnx,ocyx->opqcabmn", select, select, weight)
    return w2.reshape(out_ch * r * r, in_ch * r * r, len(m), len(m))


class ChannelsLastPixelShuffle(nn.PixelShuffle):
    """nn.PixelShuffle that keeps a channels_last input channels_last on every device."""

    def forward(self, x):
        return pixel_shuffle(x, self.upscale_factor)


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """F.pixel_shuffle, with a channels_last input kept channels_last on every device."""
    if x.device.type in CHANNELS_LAST_SHUFFLE_DEVICES or not x.is_contiguous(memory_format=torch.channels_last):
        return F.pixel_shuffle(x, r)
    return ChannelsLastShuffle.apply(x, r)


class ChannelsLastShuffle(torch.autograd.Function):
    """pixel_shuffle from channels_last to channels_last in one copy; its gradient likewise."""

    @staticmethod
    def forward(ctx, x, r):
        ctx.r = r
        n, c, h, w = x.shape
        out = torch.empty((n, c // r ** 2, h * r, w * r), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
        out.view(n, c // r ** 2, h, r, w, r).copy_(x.view(n, c // r ** 2, r, r, h, w).permute(0, 1, 4, 2, 5, 3))
        return out

    @staticmethod
    def backward(ctx, grad):
        r, (n, c, h, w) = ctx.r, grad.shape
        out = torch.empty((n, c * r * r, h // r, w // r), dtype=grad.dtype, device=grad.device,
                          memory_format=torch.channels_last)
        out.view(n, c, r, r, h // r, w // r).copy_(grad.view(n, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4))
        return out, None
