"""machinery/fast.py: the fast forms compute what model.py draws, with the same weights, names and gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from machinery import fast
from machinery.fast import ChannelsLastShuffle, build_fast_network, fast_forms, subpixel_conv_weight
from machinery.upscale import upscale
from model import ResShuffle, build_network


def drawn_and_fast(**options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A ResShuffle as drawn, with weights non-zero everywhere (biases too), and its fast form."""
    drawn = ResShuffle(**options).double()
    with torch.no_grad():
        for p in drawn.parameters():
            p.normal_(0, 0.3)
    return drawn, fast_forms(copy.deepcopy(drawn))


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_the_tail_before_the_shuffle_equals_the_tail_after_it_with_the_same_gradients(scale):
    torch.manual_seed(scale)
    drawn, quick = drawn_and_fast(scale=scale, num_features=6, num_residuals=1, mean_shift=True, image_skip=True)
    x = torch.rand(2, 3, 7, 5, dtype=torch.double)
    outs = [net(x) for net in (drawn, quick)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=0)  # borders (zero padding) too
    grads = [torch.autograd.grad(out.pow(2).sum(), list(net.parameters())) for out, net in zip(outs, (drawn, quick))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_the_fast_forms_keep_the_parameters_their_names_and_the_state_dict():
    torch.manual_seed(0)
    net = ResShuffle(**TINY)
    params, state = list(net.parameters()), net.state_dict()
    fast_forms(net)
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]  # an optimizer built before still steps them
    assert list(net.state_dict()) == list(state)
    drawn = build_network({"arch": "resshuffle", **TINY})
    drawn.load_state_dict(net.state_dict())  # a checkpoint of either loads into the other
    net.load_state_dict(drawn.state_dict())


def test_the_sub_pixel_tail_applies_only_where_its_preconditions_hold():
    net = build_fast_network({"arch": "resshuffle", **TINY})
    assert isinstance(net.tail, fast.SubpixelConv) and not any(type(m) is torch.nn.PixelShuffle for m in net.modules())
    edsr = build_fast_network({"arch": "edsr_baseline", "scale": 4, "num_features": 8, "num_residuals": 1})
    assert type(edsr.tail) is torch.nn.Conv2d and len(edsr.upsample) == 4  # as drawn, its shuffles kept channels_last
    assert all(type(m) is not torch.nn.PixelShuffle for m in edsr.modules())
    strided = ResShuffle(**TINY)
    strided.tail.stride = (2, 2)  # no longer a same-size conv: the rearrangement would be wrong
    assert type(fast_forms(strided).tail) is torch.nn.Conv2d
    unbiased = ResShuffle(**TINY)
    unbiased.tail = torch.nn.Conv2d(8, 3, 9, padding=4, bias=False)
    assert type(fast_forms(unbiased).tail) is torch.nn.Conv2d


def test_a_subclass_that_changes_what_lies_between_the_upsampling_and_the_tail_runs_as_drawn():
    class Flipped(ResShuffle):
        def reconstruct(self, features, x):
            return self.tail(self.upsample(features).flip(-1)) + self.base(x)

    torch.manual_seed(0)
    drawn = Flipped(**TINY)
    x = torch.rand(1, 3, 6, 7)
    expected = drawn(x)
    assert torch.equal(fast_forms(drawn)(x), expected)


@pytest.mark.parametrize("size, r", [(9, 2), (9, 3), (3, 2), (5, 4)])
def test_subpixel_weight_keeps_every_tap_once(size, r):
    weight = torch.arange(1.0, 2 * 3 * size * size + 1).view(2, 3, size, size)
    w2 = subpixel_conv_weight(weight, r)
    assert w2.shape[:2] == (2 * r * r, 3 * r * r)
    # Each output phase holds every tap of its output channel once; the rest are zeros.
    for o in range(2):
        for phase in range(r * r):
            taps = w2[o * r * r + phase]
            assert sorted(taps[taps != 0].tolist()) == weight[o].flatten().tolist()


def test_inference_builds_the_rearranged_tail_once_until_the_weights_change(monkeypatch):
    built = []
    real = fast.subpixel_conv_weight
    monkeypatch.setattr(fast, "subpixel_conv_weight", lambda w, r: built.append(1) or real(w, r))
    torch.manual_seed(0)
    net = build_fast_network({"arch": "resshuffle", "scale": 2, "num_features": 4, "num_residuals": 1}).eval()
    img = (torch.rand(20, 18, 3) * 255).byte().numpy()
    first = upscale(net, img, tile=5)  # 16 tiles
    assert len(built) == 1
    with torch.no_grad():
        net.tail.weight.mul_(2)  # an in-place update, as an optimizer step or load_state_dict makes
    second = upscale(net, img, tile=5)
    assert len(built) == 2 and not (first == second).all()
    net.train()
    net(torch.rand(1, 3, 4, 4)).sum().backward()  # with gradients: built on every call, never cached
    assert len(built) == 3 and net.tail.weight.grad is not None


def test_an_fp32_call_after_a_bf16_one_uses_the_fp32_tail():
    """The tail kept from a bf16 autocast call must serve a later fp32 call (app.py and evaluate.py
    run both precisions on one loaded network), and each call must equal the drawn network's."""
    torch.manual_seed(0)
    drawn = build_network({"arch": "resshuffle", "scale": 2, "num_features": 4, "num_residuals": 1}).eval()
    net = fast_forms(copy.deepcopy(drawn))
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, drawn_low = net(x), drawn(x)
        full, drawn_full = net(x), drawn(x)
    assert full.dtype == torch.float32 and torch.allclose(full, drawn_full, atol=1e-6)
    assert torch.allclose(low.float(), drawn_low.float(), atol=2e-2)


def test_a_fast_network_built_under_inference_mode_runs_there():
    with torch.inference_mode():
        net = build_fast_network({"arch": "resshuffle", "scale": 2, "num_features": 4, "num_residuals": 1}).eval()
        assert net(torch.rand(1, 3, 5, 6)).shape == (1, 3, 10, 12)


@pytest.mark.parametrize("arch", ["resshuffle", "edsr_baseline", "espcn"])
def test_shuffles_keep_channels_last_where_torch_would_not(monkeypatch, arch):
    """CUDA's pixel_shuffle returns NCHW from channels_last; stood in for here by a CPU shuffle that does."""
    real = F.pixel_shuffle
    monkeypatch.setattr(fast.F, "pixel_shuffle", lambda x, r: real(x, r).contiguous())
    torch.manual_seed(0)
    options = {"num_features": 8} | ({"num_residuals": 1} if arch != "espcn" else {})
    net = build_fast_network({"arch": arch, "scale": 4, **options}).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 6, 7).contiguous(memory_format=torch.channels_last)
    expected = net(x)
    shuffled = []
    for m in net.modules():
        if isinstance(m, torch.nn.PixelShuffle):
            m.register_forward_hook(
                lambda m, a, out: shuffled.append(out.is_contiguous(memory_format=torch.channels_last)))
    monkeypatch.setattr(fast, "CHANNELS_LAST_SHUFFLE_DEVICES", set())  # as on CUDA
    out = net(x)
    assert shuffled and all(shuffled) and torch.equal(out, expected)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "expanded"])
def test_the_channels_last_shuffle_equals_pixel_shuffle_with_its_gradient(layout):
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = ChannelsLastShuffle.apply(x, 2)
    grad = {"channels_last": torch.randn_like(y), "contiguous": torch.randn(y.shape),
            "expanded": torch.ones(1).expand(y.shape)}[layout]  # the last: what .sum().backward() sends
    y.backward(grad)
    ours = x.grad.clone()
    x.grad = None
    F.pixel_shuffle(x, 2).backward(grad)
    assert torch.equal(y, F.pixel_shuffle(x, 2)) and torch.equal(ours, x.grad)
    assert y.is_contiguous(memory_format=torch.channels_last) and ours.is_contiguous(memory_format=torch.channels_last)
