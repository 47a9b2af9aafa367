"""The one exception type whose message is meant for the user, not a traceback."""


class CalibnetError(Exception):
    """A problem with the user's input or setup, described in one line that names the file or case
    and says what to do. Command-line tools print it without a traceback."""
