"""The one exception type whose message is meant for the user, not a traceback."""


class CalibnetError(Exception):
    """A problem with the user's input or setup, described in one line that names the file or case
    and says what to do. Command-line tools print it without a traceback."""


class UsageError(CalibnetError):
    """Flags of one request that do not fit together (e.g. a confidence-head flag on another method).
    Command-line tools print it with the usage line and exit with status 2, as click does for bad flags."""
