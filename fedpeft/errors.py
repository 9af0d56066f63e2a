"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class FedpeftError(Exception):
    """A mistake in the user's input (path, file, flag) or a mismatch they can fix."""
