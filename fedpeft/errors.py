"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class FedpeftError(Exception):
    """A mistake in the user's input (path, file, flag) or a mismatch they can fix."""


def require(module: str, extra: str, purpose: str) -> None:
    """Import `module`, which fedpeft's core install (a device's) leaves out, or say in one line which
    extra brings it: `pip install 'fedpeft[EXTRA]'`."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise FedpeftError(
            f"{purpose} needs {module.split('.')[0]}, which a device's install leaves out: "
            f"pip install 'fedpeft[{extra}]'"
        ) from None


class TooLittleData(FedpeftError):
    """A user with too little text or too few examples to be a client: such users are left out of a corpus,
    where any other error stops the run."""
