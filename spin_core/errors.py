"""The error every user-facing failure derives from: the CLI prints its message as one line and exits 2."""


class SpinError(Exception):
    """A problem the user can act on; its message says what and where, never a traceback."""
