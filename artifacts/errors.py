"""The one exception type for user errors: the CLI prints its message on one line, no traceback."""


class MepfError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
