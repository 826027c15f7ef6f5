"""Training recipes by name (training.RECIPES, train.py --recipe) and --target_psnr."""
import math
import signal

import pytest
import torch

import train
import training
from conftest import TINY_RUN, make_images, read_log, run_main, run_train_stopped_at_step
from machinery.checkpoint import load_checkpoint, save_checkpoint
from machinery.runs import RUN_FORMAT, upgrade_run_checkpoint
from model import ResidualBlock, build_network

# A recipe that uses every knob the seed leaves at its default.
TRIAL = {"optimizer": "adamw", "betas": (0.9, 0.99), "weight_decay": 1e-4, "schedule": "cosine",
         "warmup_steps": 4, "min_lr_ratio": 0.1, "init": "zero_residual", "clip_grad_norm": 0.5, "lr": 1e-3}


@pytest.fixture
def trial_recipe(monkeypatch):
    monkeypatch.setitem(training.RECIPES, "trial", TRIAL)
    return "trial"


def run_flags(images, runs, name, *extra):
    return ["--train_dir", images, "--val_dir", images, "--checkpoint_dir", runs, "--run_name", name, *TINY_RUN,
            "--data_cache", "none", *extra]


def test_the_seed_recipe_is_the_default_and_the_originals_flags():
    args = train.parse_args([])
    assert args.recipe == "seed"
    assert (args.lr, args.step_size, args.gamma, args.batch_size) == (2e-4, 50, 0.5, 32)
    parser = train.build_parser()
    flags = {k: v for k, v in training.RECIPES["seed"].items() if k in train.FLAGS}
    assert flags == {k: parser.get_default(k) for k in flags}  # --help's defaults are the seed's


def test_a_recipe_sets_its_flags_and_a_typed_flag_overrides_it():
    args = train.parse_args(["--recipe", "shipped"])
    assert (args.lr, args.step_size, args.batch_size, args.num_epochs) == (5e-4, 20, 16, 60)
    assert train.network_args(args) | {"mean_shift": True, "image_skip": True} == train.network_args(args)
    typed = train.parse_args(["--recipe", "shipped", "--lr", "1e-3", "--batch_size", "8", "--no-image_skip"])
    assert (typed.lr, typed.batch_size, typed.step_size) == (1e-3, 8, 20)
    assert train.network_args(typed)["image_skip"] is False and train.network_args(typed)["mean_shift"] is True
    # A network without the recipe's options takes the rest of the recipe, not an error.
    espcn = train.parse_args(["--recipe", "shipped", "--arch", "espcn"])
    assert "mean_shift" not in train.network_args(espcn)


def test_a_recipes_lr_patch_size_gives_each_scale_its_hr_patch_and_a_typed_patch_size_wins():
    for scale, hr in ((2, 64), (3, 96), (4, 128)):
        args = train.parse_args(["--recipe", "fast", "--upscale_factor", str(scale)])
        assert args.patch_size == hr and "patch_size" in args.from_recipe
    assert train.parse_args(["--recipe", "fast", "--upscale_factor", "3", "--patch_size", "120"]).patch_size == 120
    assert train.parse_args(["--recipe", "shipped", "--upscale_factor", "3"]).patch_size is None  # 48 x scale


@pytest.mark.parametrize("name", list(training.RECIPES) + ["trial"])
def test_every_recipe_builds_its_optimizer_schedule_and_initialisation(name, trial_recipe):
    model = build_network({"arch": "resshuffle", "scale": 2, "num_features": 4, "num_residuals": 2})
    how, recipe = training.recipe_how(name), training.RECIPES[name]
    training.initialise(model, how)
    optimizer = training.make_optimizer(model, how | {"total_steps": 20}, lr=recipe["lr"])
    schedule = training.make_schedule(optimizer, how | {"total_steps": 20}, step_size=recipe.get("step_size", 50),
                                      gamma=recipe.get("gamma", 0.5))
    before = [p.clone() for p in model.parameters()]
    model(torch.rand(1, 3, 6, 6)).mean().backward()
    optimizer.step()
    schedule.step()
    assert training.how_fault(how) is None
    assert set(recipe) <= {*training.HOW_KEYS, *training.RECIPE_FLAGS, training.LR_PATCH_KEY}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trains


def test_muon_gives_the_hidden_convs_orthogonalised_steps_and_adamw_the_rest():
    torch.manual_seed(0)
    model = build_network({"arch": "resshuffle", "scale": 2, "num_features": 8, "num_residuals": 2})
    how = training.recipe_how("fast") | {"weight_decay": 0.0}
    optimizer = training.make_optimizer(model, how, lr=1e-2)
    muon, adam = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon["muon"] and not adam["muon"]
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 4
        and not n.startswith(("head", "tail")))  # the RGB head and tail stay on Adam, as do the biases
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.rand(2, 3, 6, 6)).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for n, p in model.named_parameters():
        step = p.detach() - before[n]
        if any(p is q for q in muon["params"]):
            g = grads[n].reshape(grads[n].shape[0], -1)
            s = torch.linalg.svdvals(step.reshape(g.shape) / (-1e-2 * 0.2 * max(g.shape) ** 0.5))
            assert (s[s > 1e-4] > 0.5).all() and s.max() < 1.25, n  # g's directions at about one rate
            nesterov = g + 0.95 * g  # the first step: momentum buffer g, plus 0.95 of it
            expected = -1e-2 * 0.2 * max(g.shape) ** 0.5 * training.orthogonalise(nesterov)
            assert torch.allclose(step.reshape(g.shape), expected, atol=1e-6), n  # p + step rounds in float32
        else:  # Adam's first step: lr x g / (|g| + eps)
            assert torch.allclose(step, -1e-2 * grads[n] / (grads[n].abs() + 1e-8), atol=1e-7), n


def test_the_cosine_schedule_warms_up_linearly_then_decays_to_its_floor(trial_recipe):
    model = torch.nn.Linear(2, 2)
    how = training.recipe_how("trial")
    optimizer = training.make_optimizer(model, how, lr=1e-3)
    schedule = training.make_schedule(optimizer, how | {"total_steps": 24}, step_size=1, gamma=1.0)
    lrs = []
    for _ in range(24):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # never rising after the warmup
    assert schedule.get_last_lr()[0] == pytest.approx(1e-4)  # min_lr_ratio x lr at the last step
    assert training.stepped_every_batch(how) and not training.stepped_every_batch(training.recipe_how("seed"))


@pytest.mark.parametrize("entry, message", [
    ({"learning_rate": 1e-3}, "learning_rate: not keys a recipe has"),
    ({"lr": "fast"}, "--lr is 'fast'"),
    ({"batch_size": 0}, "--batch_size is 0"),
    ({"optimizer": "sgd"}, "its optimizer is 'sgd'"),
    ({"betas": (0.9,)}, "its betas"),
    ({"min_lr_ratio": math.nan}, "its min_lr_ratio"),
    ({"schedule": "steplr", "warmup_steps": 10}, "its warmup_steps"),
    ({"lr_patch_size": 0}, "its lr_patch_size is 0"),
    ({"lr_patch_size": 32, "patch_size": 100}, "both patch_size and lr_patch_size"),
])
def test_a_bad_recipe_entry_is_one_line_naming_it(monkeypatch, capsys, entry, message):
    monkeypatch.setitem(training.RECIPES, "bad", TRIAL | entry)
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--recipe", "bad"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "training.RECIPES['bad']" in err and message in err, err


def fraction(step: int, warmup=4, total=9, floor=0.1) -> float:
    """TRIAL's schedule at `step`, as written in its definition."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_zero_residual_init_starts_every_block_as_its_skip_path():
    model = build_network({"arch": "resshuffle", "scale": 2, "num_features": 4, "num_residuals": 3})
    training.initialise(model, {"init": "zero_residual"})
    x = torch.rand(1, 4, 5, 5)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3 and all(torch.equal(block(x), x) for block in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_resumed_run_under_a_recipe_equals_the_uninterrupted_one(trial_recipe, optimizer, tmp_path, monkeypatch):
    monkeypatch.setitem(training.RECIPES, trial_recipe, TRIAL | {"optimizer": optimizer})
    images = make_images(tmp_path / "images")
    flags = ["--recipe", trial_recipe, "--num_epochs", "3"]
    code, _, err = run_main(train, *run_flags(images, tmp_path / "runs", "whole", *flags))
    assert code == 0, err
    # Ctrl-C during step 5: epoch 2 of 3-step epochs
    code, _, err = run_train_stopped_at_step(monkeypatch, 5, *run_flags(images, tmp_path / "runs", "stopped", *flags))
    assert code == 128 + signal.SIGINT, err
    last = tmp_path / "runs" / "stopped" / "last.pt"
    code, _, err = run_main(train, "--resume", last, "--recipe", "seed")
    assert code == 1 and "--recipe trial" in err and "can't change on resume" in err
    code, _, err = run_main(train, "--resume", last)
    assert code == 0, err
    resumed, whole = load_checkpoint(last), load_checkpoint(tmp_path / "runs" / "whole" / "last.pt")
    assert resumed["args"]["recipe"] == trial_recipe
    assert resumed["recipe"] == training.recipe_how(trial_recipe) | {"total_steps": 9}
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name  # bit for bit on a CPU
    # Stepped once a step: each epoch's lr is the schedule's at its first step, 0, 3 and 6 of 9.
    expected = [f"{1e-3 * fraction(step):.6g}" for step in (0, 3, 6)]
    assert [r["lr"] for r in read_log(tmp_path / "runs" / "stopped")] == expected
    assert [r["lr"] for r in read_log(tmp_path / "runs" / "whole")] == expected
    assert resumed["scheduler"]["last_epoch"] == 9 and resumed["recipe"]["total_steps"] == 9
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * fraction(9))


@pytest.mark.slow
def test_target_psnr_stops_at_the_first_validation_that_reaches_it_and_says_when(tmp_path):
    images = make_images(tmp_path / "images")
    code, out, err = run_main(train, *run_flags(images, tmp_path / "runs", "r", "--num_epochs", "5",
                                                "--target_psnr", "1"))
    assert code == 0, err
    assert "reached --target_psnr 1.0 dB" in out and "after epoch 1, 3 steps of 4" in out
    assert len(read_log(tmp_path / "runs" / "r")) == 1
    code, out, err = run_main(train, "--resume", tmp_path / "runs" / "r" / "last.pt", "--num_epochs", "2")
    assert code == 0 and "reached" not in out, err  # the target was that invocation's only
    code, _, err = run_main(train, "--export", tmp_path / "runs" / "r" / "best.pt", tmp_path / "r.safetensors")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "r.safetensors")["training"]["recipe"] == "seed"


@pytest.mark.slow
def test_a_run_saved_before_recipes_resumes_as_the_seed_recipe(tmp_path):
    images = make_images(tmp_path / "images")
    code, _, err = run_main(train, *run_flags(images, tmp_path / "runs", "r", "--num_epochs", "1"))
    assert code == 0, err
    last = tmp_path / "runs" / "r" / "last.pt"
    old = load_checkpoint(last)
    del old["recipe"], old["args"]["recipe"]
    save_checkpoint(old | {"format": 2}, last)
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "2")
    assert code == 0, err
    resumed = load_checkpoint(last)
    assert resumed["format"] == RUN_FORMAT and resumed["args"]["recipe"] == "seed"
    assert resumed["recipe"] == training.recipe_how("seed") | {"total_steps": 6}


def test_a_run_saved_before_gradient_clipping_resumes_unclipped():
    how = training.recipe_how("seed")
    old = {"format": 3, "args": {}, "recipe": {k: v for k, v in how.items() if k != "clip_grad_norm"}}
    upgraded = upgrade_run_checkpoint(old, "last.pt", "cpu")
    assert upgraded["format"] == RUN_FORMAT and upgraded["recipe"] == how and how["clip_grad_norm"] == 0


def test_clipping_scales_the_gradients_down_to_the_recipes_norm_and_leaves_small_ones():
    def grad_norm_after(clip):
        torch.manual_seed(0)
        model = build_network({"arch": "resshuffle", "scale": 2, "num_features": 4, "num_residuals": 1})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        training.train_step(model, torch.rand(2, 3, 6, 6), torch.rand(2, 3, 12, 12), optimizer, scaler, "fp32",
                            clip_grad_norm=clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    unclipped = grad_norm_after(0.0)
    assert grad_norm_after(unclipped / 4) == pytest.approx(unclipped / 4, rel=1e-4)
    assert grad_norm_after(unclipped * 4) == pytest.approx(unclipped, rel=1e-6)
