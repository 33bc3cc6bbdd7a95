"""The one exception type that means "the user gave us something wrong"; the CLI prints its message
on one line and exits 2 (``--debug`` shows the traceback)."""


class UserError(Exception):
    """A problem with the user's input, whose message names the problem and the fix."""


class TrainingDiverged(Exception):
    """The loss became NaN/inf; the message names the step and what to try (the CLI exits 1)."""
