"""Command-line parsing shared by train.py, predict.py and export.py: no prefix matching (`--epoch 1` is not
silently `--epochs 1`), errors as one line with a "did you mean", number types that say what they accept,
and --help that shows a default only where it says something."""

import argparse
import difflib
import math
import re

from errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """No prefix matching (`--epoch 1` is not silently `--epochs 1`); errors are one line with a suggestion."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flags = [s for action in self._actions for s in action.option_strings]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], flags, n=1, cutoff=0.6)
            message += f"; did you mean {close[0]}?" if close else ""
        message = re.sub(r"^argument (-[^:/ ]+)[^:]*: ", r"\1 ", message)  # "--epochs must be positive, got 0"
        raise UsageError(f"{message} (see --help)")


def number(kind, allowed, requirement):
    """An argparse type: a finite `kind` (int or float) for which allowed(value) holds."""

    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and allowed(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'three'"
    return parse


POSITIVE_INT, POSITIVE = number(int, lambda v: v > 0, "positive"), number(float, lambda v: v > 0, "positive")
COUNT, NON_NEGATIVE = number(int, lambda v: v >= 0, "0 or more"), number(float, lambda v: v >= 0, "0 or more")
FRACTION = number(float, lambda v: 0 < v < 1, "between 0 and 1")
PROBABILITY = number(float, lambda v: 0 <= v <= 1, "from 0 to 1")
FOLDS = number(int, lambda v: v >= 2, "at least 2")
IMAGE_SIZE, SMOOTHING = number(int, lambda v: v >= 16, "at least 16"), number(float, lambda v: 0 <= v < 1, "in [0, 1)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where X says something the help text does not."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
