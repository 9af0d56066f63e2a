"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class FedpeftError(Exception):
    """A mistake in the user's input (path, file, flag) or a mismatch they can fix."""


class TooLittleData(FedpeftError):
    """A user with too little text or too few examples to be a client: such users are left out of a corpus,
    where any other error stops the run."""
