"""Run train.py under torchrun and also save each rank's final weights, so a test can compare the ranks.

Weights are the parameters: BatchNorm's running statistics are rank 0's in every checkpoint (DDP broadcasts
them at each forward pass), but each rank's copy reflects its own last batch.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

fit = train.fit


def fit_and_save_weights(args, training, ctx, checkpoint):
    result = fit(args, training, ctx, checkpoint)
    parameters = dict(training["model"].named_parameters())
    torch.save(
        {name: p.detach() for name, p in parameters.items()},
        Path(os.environ["WEIGHTS_DIR"]) / f"rank{os.environ['RANK']}.pt",
    )
    return result


train.fit = fit_and_save_weights
sys.exit(train.run_cli())
