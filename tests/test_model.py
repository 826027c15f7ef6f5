"""model.py: the networks as drawn, their parameter counts, options, scales and receptive radius."""
import pytest
import torch
import torch.nn.functional as F

from model import ResShuffle


def test_default_model_has_the_original_parameter_count():
    # 9x9 head 15,616 + 16 blocks x 73,856 + body conv 36,928 + two x2 stages x 147,712 + 9x9 tail 15,555
    assert sum(p.numel() for p in ResShuffle().parameters()) == 1_545_219


def test_options_change_no_parameter_or_state_dict_key():
    plain = ResShuffle(num_features=8, num_residuals=2)
    both = ResShuffle(num_features=8, num_residuals=2, mean_shift=True, image_skip=True)
    assert plain.state_dict().keys() == both.state_dict().keys()


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
@pytest.mark.parametrize("size", [(7, 5), (16, 16), (1, 1)])
def test_output_is_exactly_scale_times_the_input(scale, size):
    model = ResShuffle(scale=scale).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, size[0] * scale, size[1] * scale)


def test_unsupported_scale_names_the_supported_ones():
    with pytest.raises(ValueError, match="2, 3, 4, 8"):
        ResShuffle(scale=5)


def test_image_skip_with_a_silent_network_is_bicubic_upsampling():
    model = ResShuffle(scale=4, num_features=8, num_residuals=1, mean_shift=True, image_skip=True)
    torch.nn.init.zeros_(model.tail.weight)
    torch.nn.init.zeros_(model.tail.bias)
    x = torch.rand(1, 3, 9, 11)
    expected = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_mean_shift_without_skip_adds_the_mean_back():
    model = ResShuffle(scale=2, num_features=8, num_residuals=1, mean_shift=True)
    torch.nn.init.zeros_(model.tail.weight)
    torch.nn.init.zeros_(model.tail.bias)
    out = model(torch.rand(1, 3, 4, 4))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.4488, 0.4371, 0.4040]))


@pytest.mark.parametrize("scale,num_residuals", [(4, 2), (3, 1), (2, 0)])
def test_receptive_radius_bounds_what_an_output_pixel_sees(scale, num_residuals):
    torch.manual_seed(0)
    model = ResShuffle(scale=scale, num_features=4, num_residuals=num_residuals).double()
    size = 64
    x = torch.rand(1, 3, size, size, dtype=torch.double, requires_grad=True)
    centre = size // 2 * scale
    model(x)[0, :, centre, centre].sum().backward()
    rows, cols = torch.nonzero(x.grad.abs().sum(1)[0], as_tuple=True)
    reach = max((rows - size // 2).abs().max(), (cols - size // 2).abs().max()).item()
    # The bound holds and is tight: one pixel less would miss inputs that matter.
    assert model.receptive_radius() - 1 <= reach <= model.receptive_radius()


def test_a_network_built_under_inference_mode_runs_there():
    with torch.inference_mode():
        model = ResShuffle(scale=2, num_features=4, num_residuals=1).eval()
        assert model(torch.rand(1, 3, 5, 6)).shape == (1, 3, 10, 12)
