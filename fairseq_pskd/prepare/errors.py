"""The one exception type of the prepare package."""


class PrepareError(RuntimeError):
    """A problem the user can fix (bad input, missing tool); main() prints it without a traceback
    and exits with status 1."""
