#!/usr/bin/env bash
# On a CUDA machine: the GPU and versions, the CUDA tests, then training throughput of resnet34 at 224 px
# (bf16 autocast, channels_last, RAM cache on, one DataLoader worker per core) at batch 64, 128 and 256,
# and the DataLoader alone. About two minutes on one H200.
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

nvidia-smi -L
python -c "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, \
CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, bf16 {torch.cuda.is_bf16_supported()}')"
# The CUDA tests skip themselves without CUDA: make that a failure here, not six quiet skips.
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA device')"

python -m pytest tests/test_cuda.py -q -rs
python benchmarks/gpu_throughput.py --device cuda --image-size 224 --batch-sizes 64,128,256
