"""The training recipe (recipe.py): augmentation, progressive resizing, MixUp/CutMix, EMA, the LR range test."""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import v2

import plots
import presets
import recipe
import report


def photo(seed=0, size=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def tiny_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


# ------------------------------------------------------------------------------------------ augmentation


def test_default_train_transform_is_bit_identical_to_the_tutorial_one():
    ours = presets.train_transform(32)
    theirs = v2.Compose([v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    for seed in range(5):
        torch.manual_seed(seed)
        expected = theirs(photo(seed))
        torch.manual_seed(seed)
        assert torch.equal(ours(photo(seed)), expected)


@pytest.mark.parametrize("augment", presets.AUGMENTS)
def test_every_augment_gives_a_uint8_chw_tensor_of_the_crop_size(augment):
    torch.manual_seed(0)
    out = presets.train_transform(24, augment, crop_scale=0.5, random_erasing=0.5)(photo())
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)


def test_automatic_augmentations_change_the_image_beyond_crop_and_flip():
    for augment in ("trivial", "randaugment", "augmix"):
        changed = 0
        for seed in range(4):
            torch.manual_seed(seed)
            basic = presets.train_transform(32)(photo())
            torch.manual_seed(seed)  # the crop and flip draw first, so both get the same crop
            changed += not torch.equal(presets.train_transform(32, augment)(photo()), basic)
        assert changed >= 3, augment


def test_random_erasing_blanks_a_rectangle_only_when_asked():
    blank = []
    for erasing in (1.0, 0.0):
        torch.manual_seed(0)
        image = presets.train_transform(32, "trivial", random_erasing=erasing)(photo())
        blank.append((image == 0).all(0).sum().item())  # pixels black in every channel
    assert blank[0] >= 0.02 * 32 * 32 and blank[1] == 0


def test_unknown_augment_is_refused():
    with pytest.raises(ValueError, match="randaugment"):
        presets.train_transform(32, "autoaugment")


def test_crop_scale_sets_the_smallest_crop_area():
    assert presets.train_transform(32, crop_scale=0.35).transforms[0].scale == (0.35, 1.0)


def test_set_crop_size_changes_the_output_size_in_place():
    transform = presets.train_transform(32, "trivial")
    presets.set_crop_size(transform, 16)
    assert transform(photo()).shape == (3, 16, 16)


# -------------------------------------------------------------------------------- progressive resizing


@pytest.mark.parametrize(
    ("epochs", "min_size", "final_size", "expected"),
    [
        (1, 160, 224, [224]),
        (2, 160, 224, [160, 224]),
        (4, 128, 224, [128, 176, 224, 224]),  # ramp 3: 128, 176, 224
        (8, 160, 192, [160, 160, 160, 176, 176, 192, 192, 192]),  # ramp 6: 160 + 6.4k, floored to 16s
        (6, 100, 130, [100, 100, 112, 112, 130, 130]),  # ramp 5 (4.5 half up); 100 is no multiple of 16
        (5, 16, 32, [16, 16, 16, 32, 32]),  # ramp 4: 16, 21.3, 26.7, 32
    ],
)
def test_progressive_sizes_per_epoch(epochs, min_size, final_size, expected):
    assert [recipe.progressive_size(e, epochs, min_size, final_size) for e in range(1, epochs + 1)] == expected


def test_progressive_sizes_grow_and_end_at_the_final_size():
    for epochs in (3, 10, 90):
        sizes = [recipe.progressive_size(e, epochs, 160, 232) for e in range(1, epochs + 1)]
        assert sizes == sorted(sizes) and sizes[0] == 160 and sizes[-1] == 232
        assert all(s % 16 == 0 or s == 232 for s in sizes)
        assert sizes.index(232) == round(0.75 * epochs) - 1  # the ramp ends at 75%


# --------------------------------------------------------------------------------------- MixUp, CutMix


def batch(count=6, num_classes=6):
    """Each image a distinct constant, each label its own class: who was pasted where is readable."""
    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 3, 8, 10).clone()
    return images, torch.arange(count) % num_classes


def test_mixup_blends_each_image_with_the_previous_one_by_the_lam_of_its_targets():
    images, labels = batch()
    torch.manual_seed(0)
    mixed, targets = recipe.BatchMixer(0.4, 0.0, 6)(images, labels)
    assert targets.dtype == torch.float32 and targets.shape == (6, 6)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    lam = targets[0, 0].item()
    assert 0 < lam < 1 and lam != 0.5
    for i in range(6):
        previous = (i - 1) % 6
        assert targets[i, i].item() == pytest.approx(lam) and targets[i, previous].item() == pytest.approx(1 - lam)
        torch.testing.assert_close(mixed[i], lam * images[i] + (1 - lam) * images[previous])


def test_cutmix_target_weights_are_the_pasted_area():
    images, labels = batch()
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, targets = recipe.BatchMixer(0.0, 1.0, 6)(images, labels)
        for i in range(6):
            previous = (i - 1) % 6
            pasted = (mixed[i, 0] == previous).float().mean().item()
            assert ((mixed[i] == i) | (mixed[i] == previous)).all()  # pixels are pasted, never blended
            assert targets[i, previous].item() == pytest.approx(pasted)
            assert targets[i, i].item() == pytest.approx(1 - pasted)


def test_with_both_alphas_each_batch_gets_mixup_or_cutmix():
    images, labels = batch()
    mixer, kinds = recipe.BatchMixer(0.2, 1.0, 6), set()
    torch.manual_seed(0)
    for _ in range(20):
        mixed, _ = mixer(images, labels)
        blended = not ((mixed == images) | (mixed == images.roll(1, 0))).all()
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_multi_hot_targets_mix_as_probabilities():
    images = torch.randn(4, 3, 8, 8)
    multi_hot = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.float32)
    torch.manual_seed(1)
    mixed, targets = recipe.BatchMixer(0.4, 0.0, 3)(images, multi_hot)
    a, b = images[0] - images[3], mixed[0] - images[3]
    lam = ((a * b).sum() / (a * a).sum()).item()  # from the images (least squares), not the targets
    torch.testing.assert_close(targets, lam * multi_hot + (1 - lam) * multi_hot.roll(1, 0), rtol=1e-4, atol=1e-4)


def test_mixing_replays_from_torch_seed_alone():
    images, labels = batch()
    mixer, results = recipe.BatchMixer(0.2, 1.0, 6), []
    for other_seed in (1, 2):  # Python's and NumPy's generators must not matter
        random.seed(other_seed)
        np.random.seed(other_seed)
        torch.manual_seed(7)
        results.append([mixer(images, labels) for _ in range(4)])
    for (a_images, a_targets), (b_images, b_targets) in zip(*results):
        assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)
    assert not torch.equal(results[0][0][1], results[0][1][1])  # and successive batches differ


def test_mixing_leaves_the_input_batch_alone():
    images, labels = batch()
    before = images.clone()
    recipe.BatchMixer(0.2, 1.0, 6)(images, labels)
    assert torch.equal(images, before)


def test_a_mixer_without_alphas_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        recipe.BatchMixer(0.0, 0.0, 3)


# ------------------------------------------------------------------------------------------------- EMA


def train_steps(model, steps, seed=0):
    """Plain SGD steps on random data: the weights and the BatchNorm statistics change at each."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        images = torch.randn(4, 3, 8, 8, generator=generator)
        loss = model(images).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield


def test_ema_matches_an_average_computed_by_hand_with_warmup():
    torch.manual_seed(0)
    model, decay = tiny_model(), 0.9
    ema = recipe.make_ema(model, decay)
    by_hand, n = None, 0
    for _ in train_steps(model, 30):
        ema.update_parameters(model)
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if by_hand is None:
            by_hand = current
        else:
            d = min(decay, (1 + n) / (10 + n))
            by_hand = {k: current[k] if not v.is_floating_point() else d * v + (1 - d) * current[k]
                       for k, v in by_hand.items()}  # fmt: skip
        n += 1
    averaged = ema.module.state_dict()
    for key, value in by_hand.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(averaged["0.weight"], model.state_dict()["0.weight"])


def test_ema_averages_batchnorm_statistics_and_copies_the_batch_count():
    torch.manual_seed(0)
    model = tiny_model()
    ema = recipe.make_ema(model, 0.99)
    for _ in train_steps(model, 5):
        ema.update_parameters(model)
    bn, ema_bn = model[1], ema.module[1]
    assert not torch.allclose(ema_bn.running_mean, bn.running_mean)  # averaged, not copied
    assert ema_bn.running_mean.abs().sum() > 0  # but not left at their initial zeros
    assert ema_bn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 5


def test_ema_warmup_follows_the_model_early_and_the_decay_later():
    torch.manual_seed(0)
    model = tiny_model()
    ema = recipe.make_ema(model, 0.999)
    start = model[0].weight.detach().clone()
    for _ in train_steps(model, 40):
        ema.update_parameters(model)
    moved_model = (model[0].weight - start).norm()
    moved_ema = (ema.module[0].weight - start).norm()
    # A plain 0.999 average would have moved 1 - 0.999**40 = 4% of the way; the warmup gets it most of the way.
    assert 0.5 * moved_model < moved_ema < moved_model


def test_ema_resumes_bit_exactly_from_its_state_dict():
    torch.manual_seed(0)
    model = tiny_model()
    ema = recipe.make_ema(model, 0.9)
    steps = train_steps(model, 12)
    for _ in range(6):
        next(steps)
        ema.update_parameters(model)
    resumed = recipe.make_ema(tiny_model(), 0.9)  # other weights: everything comes from the state
    resumed.load_state_dict(ema.state_dict())
    for _ in steps:
        ema.update_parameters(model)
        resumed.update_parameters(model)
    for (key, a), b in zip(ema.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


# ------------------------------------------------------------------------------------ LR range test


def synthetic_range_test(loss_of_lr, **options):
    """lr_range_test on a 'model' whose loss is a function of the lr it is set to; also returns the batches used."""
    state, used = {}, []

    def train_step(images, labels):
        used.append(images)
        return loss_of_lr(state["lr"])

    result = recipe.lr_range_test(train_step, lambda lr: state.update(lr=lr), [(0, None, []), (1, None, [])], **options)
    return result, used


def test_range_test_lrs_are_geometric_from_start_to_end_and_batches_cycle():
    (lrs, losses, smoothed), used = synthetic_range_test(lambda lr: 1.0, start_lr=1e-6, end_lr=1.0, steps=7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0) and len(lrs) == 7
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    np.testing.assert_allclose(ratios, 10.0, rtol=1e-9)
    assert used == [0, 1, 0, 1, 0, 1, 0]
    assert losses == [1.0] * 7 and smoothed == pytest.approx([1.0] * 7)  # bias-corrected: no ramp from 0


def test_range_test_smoothing_is_the_bias_corrected_average():
    values = iter([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    (lrs, losses, smoothed), _ = synthetic_range_test(lambda lr: next(values), steps=8)
    beta = 0.98
    for t in range(len(losses)):
        weights = np.array([beta ** (t - i) for i in range(t + 1)])  # the weighted mean, written the other way
        assert smoothed[t] == pytest.approx(np.dot(weights, losses[: t + 1]) / weights.sum())


def test_range_test_stops_when_the_loss_diverges():
    (lrs, losses, _), _ = synthetic_range_test(lambda lr: 1.0 if lr < 1e-3 else 1.0 + 1e4 * lr)
    assert 10 < len(lrs) < 100 and lrs[-1] < 1.0
    assert losses[-1] > 4.0


def test_range_test_stops_before_a_non_finite_loss():
    (lrs, losses, smoothed), _ = synthetic_range_test(lambda lr: 1.0 if lr < 1e-4 else math.nan)
    assert len(lrs) == len(losses) == len(smoothed) and all(lr < 1e-4 for lr in lrs) and len(lrs) > 10
    assert all(math.isfinite(loss) for loss in losses)


def test_a_range_test_without_one_finite_loss_suggests_nothing():
    (lrs, losses, smoothed), _ = synthetic_range_test(lambda lr: math.nan)
    assert lrs == losses == smoothed == []
    assert recipe.suggest_lr(lrs, smoothed) is None  # train.find_lr turns this into a one-line error


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = list(np.geomspace(1e-7, 10, 100))
    x = np.log10(lrs)
    # A sigmoid drop centred on 1e-3 (its steepest point), then a blow-up past 1e-1, steeper still but rising.
    curve = 2.5 - 2 / (1 + np.exp(-2 * (x + 3))) + np.where(x > -1, 50 * (x + 1) ** 2, 0)
    suggestion = recipe.suggest_lr(lrs, list(curve))
    assert 1e-3 / 1.5 < suggestion < 1e-3 * 1.5


def test_suggestion_falls_back_to_a_tenth_of_the_minimum_with_few_points():
    assert recipe.suggest_lr([1e-4, 1e-3, 1e-2], [1.0, 0.5, 2.0]) == pytest.approx(1e-4)
    assert recipe.suggest_lr([1e-4, 1e-3], [0.4, 0.5]) == pytest.approx(1e-5)


def test_range_test_on_a_real_model_suggests_an_lr_where_its_loss_falls():
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-7)
    images, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))

    def train_step(images, labels):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def set_lr(lr):
        for group in optimizer.param_groups:
            group["lr"] = lr

    lrs, losses, smoothed = recipe.lr_range_test(train_step, set_lr, [(images, labels)], 1e-5, 100.0, 60)
    suggestion = recipe.suggest_lr(lrs, smoothed)
    assert min(losses) < 0.5 * losses[0]  # it trained: one batch, memorised
    at = lrs.index(suggestion)
    assert losses[at + 5] < losses[at] < losses[0]  # still falling there, and already below the start


@pytest.mark.pictures
def test_lr_find_png_is_written(tmp_path):
    lrs = list(np.geomspace(1e-6, 1, 40))
    losses = [2.0 - 0.03 * i + 0.1 * math.sin(i) for i in range(40)]
    assert report.save_picture(tmp_path, plots.draw_lr_find(lrs, losses, losses, 3e-4)) is True
    with Image.open(tmp_path / "lr_find.png") as picture:
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 200


# ------------------------------------------------------------------------------------ in a train.py run


def test_mixed_targets_count_their_share_of_the_predicted_class():
    import train

    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    mixed = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0]])
    assert float(train.count_correct(logits, mixed, multi_label=False)) == pytest.approx(0.7 + 0.0)
    assert int(train.count_correct(logits, torch.tensor([0, 2]), multi_label=False)) == 2


def test_ema_best_pt_holds_the_averaged_weights_and_resume_is_bitwise(train_tiny, tmp_path):
    from conftest import run_train

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_tiny("--epochs", "2", "--ema", "0.9", "--mixup", "0.4", output_dir=straight)[0] == 0
    last = torch.load(straight / "last.pt", weights_only=True)
    averaged = {key.removeprefix("module."): value for key, value in last["ema"].items() if key != "n_averaged"}
    assert any(not torch.equal(averaged[key], last["model"][key]) for key in last["model"])  # it is an average
    assert train_tiny("--epochs", "1", "--ema", "0.9", "--mixup", "0.4", output_dir=resumed)[0] == 0
    best, first = (torch.load(resumed / name, weights_only=True) for name in ("best.pt", "last.pt"))
    for key in best["model"]:  # best.pt (epoch 1, the only one) is what scored: the average, not the raw weights
        assert torch.equal(best["model"][key], first["ema"][f"module.{key}"]), key
    assert run_train("--output-dir", resumed, "--resume", "--epochs", "2") == 0
    again = torch.load(resumed / "last.pt", weights_only=True)
    for key in last["ema"]:
        assert torch.equal(last["ema"][key], again["ema"][key]), key
    for key in last["model"]:
        assert torch.equal(last["model"][key], again["model"][key]), key


def test_progressive_resizing_trains_each_epoch_at_its_size(train_tiny, monkeypatch):
    import train

    seen = {}  # epoch -> training image sizes
    original = train.train_one_epoch

    def spying(model, loss_fn, optimizer, scheduler, scaler, loader, ctx, args, epoch, *rest, **kwargs):
        seen[epoch] = {loader.dataset[i][0].shape[-1] for i in range(3)}
        return original(model, loss_fn, optimizer, scheduler, scaler, loader, ctx, args, epoch, *rest, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", spying)
    status, run_dir = train_tiny("--epochs", "4", "--image-size", "48", "--progressive", "16")
    assert status == 0
    assert seen == {epoch: {recipe.progressive_size(epoch, 4, 16, 48)} for epoch in range(1, 5)}
    assert [min(sizes) for sizes in seen.values()] == [16, 32, 48, 48]


def test_progressive_resizing_on_a_cpu_trains_in_fp32(train_tiny, capsys):
    # bf16 on a CPU has turned a 16 -> 48 px size change into a NaN loss, now and then (README)
    status, run_dir = train_tiny("--epochs", "1", "--image-size", "48", "--progressive", "16")
    assert status == 0
    assert json.loads((run_dir / "args.json").read_text())["precision"] == "fp32"
    assert "--progressive on a CPU: training in fp32" in capsys.readouterr().out


def test_the_modern_recipe_prints_its_values_and_a_flag_given_wins(train_tiny, capsys):
    import json

    status, run_dir = train_tiny("--epochs", "1", "--recipe", "modern", "--lr", "3e-4")
    assert status == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("recipe modern:"))
    for name, value in recipe.MODERN_RECIPE.items():
        if name != "lr":
            assert f"--{name.replace('_', '-')} {value:g}" in line if isinstance(value, float) else str(value) in line
    assert line.endswith("given: --lr 0.0003")
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["lr"] == 3e-4 and saved["optimizer"] == recipe.MODERN_RECIPE["optimizer"]
    assert saved["crop_scale"] == recipe.MODERN_CROP_SCALE


@pytest.mark.pictures
def test_lr_find_writes_its_picture_and_no_checkpoint(train_tiny, capsys):
    status, run_dir = train_tiny("--lr-find")
    assert status == 0
    assert sorted(path.name for path in run_dir.iterdir()) == ["lr_find.png"]
    suggested = capsys.readouterr().out.split("suggested: --lr ")[1].split()[0]
    assert 1e-7 <= float(suggested) <= 10


def test_multi_label_keeps_its_larger_crop_scale_under_the_modern_recipe():
    assert recipe.default_crop_scale("modern", multi_label=True) == recipe.MULTI_LABEL_CROP_SCALE
    assert recipe.default_crop_scale("default", multi_label=True) == recipe.MULTI_LABEL_CROP_SCALE
    assert recipe.default_crop_scale("modern", multi_label=False) == recipe.MODERN_CROP_SCALE
    assert recipe.default_crop_scale("default", multi_label=False) == 0.08  # torchvision's
