"""On a CUDA machine: training runs there, and the GPU computes what the CPU computes (fp32, bf16 autocast,
channels_last), the recipe's batch mixing and EMA included. Skipped without CUDA;
benchmarks/gpu_check.sh runs them: python -m pytest tests/test_cuda.py -q
"""

import copy

import pytest
import torch

import models
import recipe

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def strict_fp32(monkeypatch):
    """Full fp32 in convolutions and matmuls: cuDNN's default TF32 keeps only 10 mantissa bits."""
    monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee")
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")


def model_and_batch():
    """train.py's resnet18 for 3 classes, in eval mode, and a batch of 8 random 32 px images (CPU)."""
    torch.manual_seed(0)
    return models.build_model("resnet18", 3).eval(), torch.randn(8, 3, 32, 32)


@torch.inference_mode()
def probabilities(model, images, amp_dtype=None):
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(images).float().softmax(1).cpu()


def test_one_epoch_on_cuda_writes_best_checkpoint(train_tiny):
    status, run_dir = train_tiny("--epochs", "1", "--device", "cuda")
    assert status == 0
    assert (run_dir / "best.pt").is_file()
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 1


def test_cuda_fp32_predicts_what_the_cpu_predicts(strict_fp32):
    model, images = model_and_batch()
    on_cpu = probabilities(model, images)
    on_cuda = probabilities(copy.deepcopy(model).cuda(), images.cuda())
    torch.testing.assert_close(on_cuda, on_cpu, rtol=0, atol=1e-3)
    top2 = on_cpu.topk(2, 1).values
    clear = top2[:, 0] - top2[:, 1] > 2e-3  # a near tie may go either way within the tolerance
    assert torch.equal(on_cuda.argmax(1)[clear], on_cpu.argmax(1)[clear])


def test_bf16_autocast_stays_close_to_fp32():
    model, images = model_and_batch()
    model, images = model.cuda(), images.cuda()
    fp32 = probabilities(model, images)
    bf16 = probabilities(model, images, torch.bfloat16)
    assert not torch.equal(bf16, fp32)  # autocast did run in bf16
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.05)


@torch.inference_mode()
def test_channels_last_gives_the_same_outputs_as_contiguous(strict_fp32):
    model, images = model_and_batch()
    model, images = model.cuda(), images.cuda()
    contiguous = model(images)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    channels_last = model_cl(images.contiguous(memory_format=torch.channels_last))
    assert model_cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, contiguous, rtol=0, atol=1e-4)


def test_batch_mixing_on_cuda_draws_what_it_draws_on_the_cpu():
    images, labels = torch.randn(6, 3, 16, 16), torch.arange(6) % 3
    mixer, results = recipe.BatchMixer(0.2, 1.0, 3), []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)  # lam, the box and the choice come from the CPU generator on either device
        results.append([mixer(images.to(device), labels.to(device)) for _ in range(4)])
    for (cpu_images, cpu_targets), (cuda_images, cuda_targets) in zip(*results):
        assert cuda_images.is_cuda and cuda_targets.is_cuda and cuda_targets.dtype == torch.float32
        torch.testing.assert_close(cuda_images.cpu(), cpu_images)
        torch.testing.assert_close(cuda_targets.cpu(), cpu_targets)


@torch.no_grad()
def test_ema_on_cuda_matches_the_cpu(strict_fp32):
    model, _ = model_and_batch()
    averages = []
    for device in ("cpu", "cuda"):
        moving = copy.deepcopy(model).to(device)
        ema = recipe.make_ema(moving, 0.9)
        for step in range(5):
            for index, tensor in enumerate([*moving.parameters(), *moving.buffers()]):
                if tensor.is_floating_point():
                    tensor.add_(0.01 * (step + 1) * (index % 3 - 1))
            ema.update_parameters(moving)
        averages.append({key: value.cpu() for key, value in ema.module.state_dict().items()})
    for key, value in averages[0].items():
        torch.testing.assert_close(averages[1][key], value, msg=key)
