"""User-facing errors.

A :class:`UserError` is a problem with what the user gave us (a path, a column, a
cohort name, a flag).  The CLI prints it as one line and exits with status 2; it
never shows a traceback.  Anything else that escapes is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input from the user: one clear line naming the file/row/value and the fix."""

    exit_code = 2
