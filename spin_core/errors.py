"""The errors every user-facing failure derives from, and the exit code each one means.

The CLI prints the message as one line and exits with `exit_code`: 2 for a problem with the input (the spec, the
data, the model folder, the storage settings: fixing the input fixes it), 1 for a step that failed (a crash, a killed
process, corrupted data in the store: running again or regenerating the artefact fixes it).
"""

from __future__ import annotations

INPUT_ERROR = 2
STEP_FAILED = 1
INTERRUPTED = 130


class SpinError(Exception):
    """A problem the user can act on; its message says what and where, never a traceback. A problem with the input
    unless a subclass says otherwise."""

    exit_code = INPUT_ERROR


class StepFailed(SpinError):
    """A step failed for a reason other than its input (a crash, a killed process, a raising scorer)."""

    exit_code = STEP_FAILED
