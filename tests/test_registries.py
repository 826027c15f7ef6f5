"""Networks, losses and metrics by name: what each registry builds, and its one-line refusals."""
import numpy as np
import pytest
import torch

import evaluate
import metrics
import train
from conftest import TINY, TINY_RUN, assert_one_line_error, make_images, run_main
from losses import LOSSES, WeightedLoss, charbonnier, fft, parse_loss
from machinery.checkpoint import load_checkpoint, load_model, save_checkpoint
from machinery.upscale import describe_tiling, upscale
from model import ESPCN, NETWORKS, EDSRBaseline, ResShuffle, build_network, network_options
from utils import UserError


@pytest.mark.parametrize("arch", sorted(NETWORKS))
@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_every_network_upscales_by_its_scale(arch, scale):
    net = build_network({"arch": arch, "scale": scale}).eval()
    assert net(torch.rand(2, 3, 7, 9)).shape == (2, 3, 7 * scale, 9 * scale)


@pytest.mark.parametrize("arch", ["edsr_baseline", "espcn"])
def test_the_ancestors_state_their_receptive_radius_exactly(arch):
    """A pixel changed in the input changes the output exactly `receptive_radius` LR pixels away, no further."""
    torch.manual_seed(0)
    net, scale = build_network({"arch": arch, "scale": 2}).eval(), 2
    x = torch.rand(1, 3, 81, 81)
    y = x.clone()
    y[..., 40, 40] += 1
    with torch.no_grad():
        changed = torch.nonzero((net(x) - net(y)).abs().sum((0, 1)).sum(1)).flatten()
    assert 40 - changed.min().item() // scale == net.receptive_radius() == changed.max().item() // scale - 40


def test_the_ancestors_are_the_papers_networks():
    edsr, espcn = EDSRBaseline(scale=4), ESPCN(scale=3)
    assert sum(p.numel() for p in edsr.parameters()) == 1_517_571  # EDSR's paper: 1.5M for the x4 baseline
    assert edsr.head.kernel_size == (3, 3) and len(edsr.body) == 16 and edsr.tail.kernel_size == (3, 3)
    convs = [m for m in espcn.body if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [5, 3, 3] and [c.out_channels for c in convs] == [64, 32, 9]
    assert convs[0].in_channels == 1  # the paper's: the luminance only
    assert sum(isinstance(m, torch.nn.Tanh) for m in espcn.body) == 2
    assert all(m.padding_mode == "zeros" for m in [*edsr.modules(), *espcn.modules()] if isinstance(m, torch.nn.Conv2d))


def test_espcn_changes_the_luminance_only_and_keeps_bicubic_chroma():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        delta = ESPCN(scale=3)(x) - torch.nn.functional.interpolate(x, scale_factor=3, mode="bicubic")
    assert delta.abs().max() > 0.01
    torch.testing.assert_close(delta[:, 0], delta[:, 1])
    torch.testing.assert_close(delta[:, 0], delta[:, 2])
    assert ESPCN(scale=3, luminance=False).body[0].in_channels == 3


@pytest.mark.parametrize("arch, hr_border", [("edsr_baseline", 1), ("espcn", 0)])
def test_replicate_padding_makes_a_flat_images_output_the_same_at_its_edges_as_inside(arch, hr_border):
    """A flat input gives flat LR feature maps, so the output repeats with the period of the scale up
    to its edges (but for the border of EDSR's 3x3 tail at HR: replicating an HR row breaks the
    period); zero padding makes the edges differ."""
    torch.manual_seed(0)
    flat = torch.full((1, 3, 9, 11), 0.7)
    for padding, same in (("replicate", True), ("zeros", False)):
        with torch.no_grad():
            out = build_network({"arch": arch, "scale": 2, "padding": padding})(flat)
        out = out[..., hr_border:out.shape[-2] - hr_border, hr_border:out.shape[-1] - hr_border]
        periodic = torch.allclose(out[..., 2:, :], out[..., :-2, :], atol=1e-5) and torch.allclose(
            out[..., 2:], out[..., :-2], atol=1e-5)
        assert periodic == same, padding
    with pytest.raises(ValueError, match="unsupported padding 'reflect': supported are zeros, replicate"):
        build_network({"arch": arch, "scale": 2, "padding": "reflect"})


def test_tiled_upscaling_of_each_network_equals_whole_images():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    for arch in NETWORKS:
        torch.manual_seed(0)
        net = build_network({"arch": arch, "scale": 2}).eval()
        whole, tiled = upscale(net, img, tile=0), upscale(net, img, tile=32)
        assert np.abs(whole.astype(int) - tiled).max() <= 1, arch  # float rounding at a level boundary at most
        assert "same result as whole images" in describe_tiling(net, 32, None)


def test_build_network_names_an_unknown_network_or_option():
    with pytest.raises(ValueError, match="unknown network 'srcnn': known are resshuffle, edsr_baseline, espcn"):
        build_network({"arch": "srcnn", "scale": 4})
    with pytest.raises(ValueError, match="the espcn network takes no option 'num_residuals'"):
        build_network({"arch": "espcn", "scale": 4, "num_residuals": 3})
    assert network_options("espcn") == {"num_features": 64, "luminance": True, "padding": "zeros"}
    assert isinstance(build_network({"scale": 4}), ResShuffle)  # a checkpoint saved before --arch


def test_a_checkpoint_without_arch_loads_as_resshuffle(tmp_path):
    torch.manual_seed(0)
    net = ResShuffle(**TINY)
    save_checkpoint({"model": net.state_dict(), "model_args": dict(TINY)}, tmp_path / "old.pt")
    loaded, info = load_model(tmp_path / "old.pt", torch.device("cpu"))
    x = torch.rand(1, 3, 8, 8)
    assert info["arch"] == "resshuffle" and torch.allclose(loaded(x), net.eval()(x), atol=1e-6)  # channels_last


def test_weights_of_another_network_are_refused_naming_what_differs(tmp_path):
    save_checkpoint({"model": ESPCN(scale=4).state_dict(), "model_args": {"arch": "espcn", "scale": 2}},
                    tmp_path / "x.pt")
    save_checkpoint({"model": ESPCN(scale=4).state_dict(), "model_args": {"arch": "edsr_baseline", "scale": 4}},
                    tmp_path / "y.pt")
    # A network of about the weights' size names its first mismatch; one far larger is stopped before it is built.
    for name, needle in (("x.pt", ("its weights do not match its model_args {'arch': 'espcn', 'scale': 2}: "
                                   "body.4.weight is (16, 32, 3, 3), the network's is (4, 32, 3, 3)")),
                         ("y.pt", "describe a network far larger than the 24,752 weights it holds")):
        with pytest.raises(UserError) as e:
            load_model(tmp_path / name, torch.device("cpu"))
        assert needle in str(e.value)


def test_train_refuses_an_option_the_network_does_not_have(image_dir, tmp_path):
    code, _, err = run_main(train, "--arch", "espcn", "--num_residuals", "4", "--train_dir", image_dir,
                            "--val_dir", image_dir, "--checkpoint_dir", tmp_path / "runs")
    assert_one_line_error(code, err, "--num_residuals: the espcn network has no such option", "--num_features")
    assert not (tmp_path / "runs").exists()


def test_a_loss_spec_is_a_weighted_sum_of_named_losses():
    assert parse_loss("l1+0.05*fft") == [(1.0, "l1"), (0.05, "fft")]
    assert WeightedLoss(" l1 + 1*charbonnier ").spec == "l1+charbonnier"
    sr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    loss = WeightedLoss("l2+0.5*l1")
    terms = loss.terms(sr, hr)
    assert torch.allclose(terms, torch.stack([(sr - hr).square().mean(), (sr - hr).abs().mean()]))
    assert torch.allclose(loss.total(terms), terms[0] + 0.5 * terms[1])
    assert set(LOSSES) >= {"l1", "l2", "charbonnier", "fft"}


@pytest.mark.parametrize("spec, message", [("l3", "'l3' is not a loss (known: l1, l2"),
                                           ("x*l1", "'x' in 'x*l1' is not a number"),
                                           ("0*l1", "must be a positive number"), ("l1+l1", "l1 appears twice"),
                                           ("l1+", "'' is not a loss")])
def test_a_bad_loss_spec_is_named(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        parse_loss(spec)


def test_charbonnier_and_fft_losses_measure_the_error():
    hr = torch.rand(1, 3, 16, 16)
    assert charbonnier(hr, hr).item() == pytest.approx(1e-3) and fft(hr, hr).item() == 0
    noise = torch.randn(1, 3, 16, 16) * 0.1
    # orthonormal: the spectrum of the error has the error's energy (Parseval), so its size is on the pixels' scale
    assert 0.3 < fft(hr + noise, hr).item() / noise.abs().mean().item() < 3


def test_measure_gives_every_registered_metric(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    monkeypatch.setitem(metrics.METRICS, "max", metrics.Metric(lambda x, y, c, yc: 7.0, "MAX"))
    assert set(metrics.measure(a, b, 2, ("rgb", "y"), prefix="b_")) == {
        "b_psnr", "b_ssim", "b_max", "b_psnr_y", "b_ssim_y", "b_max_y"}
    assert metrics.metric_labels() == "PSNR/SSIM/MAX"
    on_device = metrics.measure_on_device(torch.from_numpy(a), torch.from_numpy(b), 2)
    assert on_device["max"] == 7.0 and on_device["psnr"] == pytest.approx(metrics.psnr(a, b, 2))


def test_a_registered_degradation_makes_lr_images_and_names_itself(monkeypatch):
    import resize
    from evaluate import protocol

    def box(img, scale):
        """Box filter, the mean of each block."""
        blocks = img.reshape(img.shape[0] // scale, scale, img.shape[1] // scale, scale, 3)
        return blocks.mean((1, 3)).round().astype(np.uint8)
    monkeypatch.setitem(resize.DEGRADATIONS, "box", box)
    hr = np.zeros((8, 12, 3), np.uint8)
    hr[::2, ::2] = 200
    assert np.array_equal(resize.downsample(hr, 2, "box"), np.full((4, 6, 3), 50, np.uint8))
    assert "LR = Box filter of the modcropped HR" in protocol(2, 2, False, "box")
    assert "LR = PIL bicubic of" in protocol(2, 2, False, "pil")
    with pytest.raises(ValueError, match="unknown degradation 'area': use one of pil, matlab, box"):
        resize.downsample(hr, 2, "area")


def test_a_run_of_a_network_no_longer_registered_is_one_line_on_resume(tmp_path):
    images = make_images(tmp_path / "images")
    code, _, err = run_main(train, "--train_dir", images, "--val_dir", images, "--checkpoint_dir", tmp_path / "runs",
                            "--run_name", "r", *TINY_RUN, "--num_epochs", "1")
    assert code == 0, err
    last = tmp_path / "runs" / "r" / "last.pt"
    state = load_checkpoint(last)
    state["model_args"]["arch"] = "removed_net"
    save_checkpoint(state, last)
    code, _, err = run_main(train, "--resume", last, "--num_epochs", "2")
    assert_one_line_error(code, err, str(last), "unknown network 'removed_net'")


def test_a_network_keeps_its_own_defaults_unless_a_flag_is_typed(tmp_path, monkeypatch):
    class Wide(ESPCN):
        def __init__(self, scale: int = 4, num_features: int = 16):
            super().__init__(scale=scale, num_features=num_features)
    monkeypatch.setitem(NETWORKS, "wide", Wide)
    args = train.parse_args(["--arch", "wide"])
    assert train.network_args(args) == {"arch": "wide", "scale": 4, "num_features": 16}
    args = train.parse_args(["--arch", "wide", "--num_features", "8"])
    assert train.network_args(args) == {"arch": "wide", "scale": 4, "num_features": 8}


def test_evaluate_writes_images_for_one_precision_only(tmp_path):
    images = make_images(tmp_path / "val")
    code, _, err = run_main(evaluate, "--data_dir", images, "--precision", "fp32", "bf16", "-o", tmp_path / "sr")
    assert_one_line_error(code, err, "several --checkpoint or --precision values write no images")
    assert not (tmp_path / "sr").exists()


def test_building_a_network_stops_where_it_outgrows_the_weights():
    """Modules without parameters count too: a checkpoint can't make the loader build endless ReLUs."""
    from machinery.checkpoint import at_most
    with pytest.raises(UserError, match="too large"), at_most(10 ** 9, 100, "too large"), torch.device("meta"):
        torch.nn.Sequential(*[torch.nn.ReLU() for _ in range(10 ** 4)])
    with pytest.raises(UserError, match="too large"), at_most(1000, 10 ** 9, "too large"), torch.device("meta"):
        torch.nn.Linear(100, 100)
    with at_most(10_100, 2, "too large"), torch.device("meta"):
        torch.nn.Linear(100, 100)  # 10,100 values, 1 module: fits
