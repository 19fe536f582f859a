"""The errors a user can cause, each meant to be shown as one line: a shared leaf that imports nothing of ours."""


class UsageError(Exception):
    """A bad flag or an impossible request. The message is meant for the user, as one line."""


class DataError(Exception):
    """Bad input data. The message is meant for the user, as one line, naming the file, line or column."""


class BadImageError(Exception):
    """An image failed to decode during training and --skip-bad-images is off."""


def one_line(error):
    """The first line of an exception's message, for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
