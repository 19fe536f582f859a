"""Run train.py under torchrun and also save each rank's weights after every epoch, so a test can compare the
ranks' final weights.

Weights are the parameters: BatchNorm's running statistics are rank 0's in every checkpoint (DDP broadcasts
them at each forward pass), but each rank's copy reflects its own last batch.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

train_one_epoch = train.train_one_epoch


def train_one_epoch_and_save_weights(model, *args, **kwargs):
    result = train_one_epoch(model, *args, **kwargs)
    parameters = {name.removeprefix("module."): p.detach() for name, p in model.named_parameters()}
    torch.save(parameters, Path(os.environ["WEIGHTS_DIR"]) / f"rank{os.environ['RANK']}.pt")
    return result


train.train_one_epoch = train_one_epoch_and_save_weights
sys.exit(train.run_cli())
