"""Run train.py's command line without drawing pictures: for tests of other behaviours that start training as
a process (signals, kill -9), where drawing would be a third of the time."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cam  # noqa: E402
import plots  # noqa: E402
import train  # noqa: E402

for name in plots.DRAWINGS:
    setattr(plots, name, lambda *args, **kwargs: None)
cam.draw_val_cam = lambda *args, **kwargs: None
sys.exit(train.run_cli())
