"""The error every training run raises for a problem the user can fix (one line at the command line)."""


class RunError(ValueError):
    """A run cannot start or resume (bad setting, output directory in use, foreign checkpoint,
    unusable model directory, a process group that cannot be formed); the message says what to do."""
