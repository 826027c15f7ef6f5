"""Training recipes by name (training.RECIPES, train.py --recipe) and --target_psnr."""
import signal

import pytest
import torch

import train
import training
from conftest import TINY_RUN, make_images, read_log, run_main
from machinery.checkpoint import load_checkpoint, save_checkpoint
from model import ResidualBlock, build_network

# A recipe that uses every knob the seed leaves at its default.
TRIAL = {"optimizer": "adamw", "betas": (0.9, 0.99), "weight_decay": 1e-4, "schedule": "cosine",
         "warmup_steps": 4, "min_lr_ratio": 0.1, "init": "zero_residual", "lr": 1e-3}


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
    typed = train.parse_args(["--recipe", "shipped", "--lr", "1e-3", "--batch_size", "8"])
    assert (typed.lr, typed.batch_size, typed.step_size) == (1e-3, 8, 20)
    # A network without the recipe's options takes the rest of the recipe, not an error.
    espcn = train.parse_args(["--recipe", "shipped", "--arch", "espcn"])
    assert "mean_shift" not in train.network_args(espcn)


@pytest.mark.parametrize("name", list(training.RECIPES) + ["trial"])
def test_every_recipe_builds_its_optimizer_schedule_and_initialisation(name, trial_recipe):
    model = build_network({"arch": "resshuffle", "scale": 2, "num_features": 4, "num_residuals": 2})
    how, recipe = training.recipe_how(name), training.RECIPES[name]
    training.initialise(model, how)
    optimizer = training.make_optimizer(model, how, lr=recipe["lr"])
    schedule = training.make_schedule(optimizer, how, step_size=recipe.get("step_size", 50),
                                      gamma=recipe.get("gamma", 0.5), total_steps=20)
    model(torch.rand(1, 3, 6, 6)).mean().backward()
    optimizer.step()
    schedule.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_cosine_schedule_warms_up_linearly_then_decays_to_its_floor(trial_recipe):
    model = torch.nn.Linear(2, 2)
    how = training.recipe_how("trial")
    optimizer = training.make_optimizer(model, how, lr=1e-3)
    schedule = training.make_schedule(optimizer, how, step_size=1, gamma=1.0, total_steps=24)
    lrs = []
    for _ in range(24):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # never rising after the warmup
    assert schedule.get_last_lr()[0] == pytest.approx(1e-4)  # min_lr_ratio x lr at the last step
    assert training.steps_per_call(how) == "step" and training.steps_per_call(training.recipe_how("seed")) == "epoch"


def test_zero_residual_init_starts_every_block_as_its_skip_path():
    model = build_network({"arch": "resshuffle", "scale": 2, "num_features": 4, "num_residuals": 3})
    training.initialise(model, {"init": "zero_residual"})
    x = torch.rand(1, 4, 5, 5)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3 and all(torch.equal(block(x), x) for block in blocks)


@pytest.mark.slow
def test_a_resumed_run_under_a_recipe_equals_the_uninterrupted_one(trial_recipe, tmp_path, monkeypatch):
    images = make_images(tmp_path / "images")
    flags = ["--recipe", trial_recipe, "--num_epochs", "3"]
    code, _, err = run_main(train, *run_flags(images, tmp_path / "runs", "whole", *flags))
    assert code == 0, err
    calls, real_step = [], train.train_step

    def step_then_stop(*args):  # Ctrl-C during step 5: epoch 2 of 3-step epochs
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args)
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", step_then_stop)
        code, _, err = run_main(train, *run_flags(images, tmp_path / "runs", "stopped", *flags))
    assert code == 128 + signal.SIGINT, err
    last = tmp_path / "runs" / "stopped" / "last.pt"
    code, _, err = run_main(train, "--resume", last, "--recipe", "seed")
    assert code == 1 and "--recipe trial" in err and "can't change on resume" in err
    code, _, err = run_main(train, "--resume", last)
    assert code == 0, err
    resumed, whole = load_checkpoint(last), load_checkpoint(tmp_path / "runs" / "whole" / "last.pt")
    assert resumed["recipe"] == training.recipe_how(trial_recipe) and resumed["args"]["recipe"] == trial_recipe
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name  # bit for bit on a CPU
    assert [r["lr"] for r in read_log(tmp_path / "runs" / "stopped")] == [r["lr"] for r in
                                                                          read_log(tmp_path / "runs" / "whole")]


@pytest.mark.slow
def test_target_psnr_stops_at_the_first_validation_that_reaches_it_and_says_when(tmp_path):
    images = make_images(tmp_path / "images")
    code, out, err = run_main(train, *run_flags(images, tmp_path / "runs", "r", "--num_epochs", "5",
                                                "--target_psnr", "1"))
    assert code == 0, err
    assert "reached --target_psnr 1.0 dB" in out and "after epoch 1, 3 steps of 4" in out
    assert len(read_log(tmp_path / "runs" / "r")) == 1
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
    assert resumed["format"] == 3 and resumed["args"]["recipe"] == "seed"
    assert resumed["recipe"] == training.recipe_how("seed")
