"""The one user-facing error type.

Library code raises `EmberError` (or a subclass) for bad input: a file, a field, a flag. The message
names the file/line/field, says what was expected, and ends with a HINT on how to fix it where one
exists. `ember` prints it as one line, without a traceback.
"""


class EmberError(Exception):
    """Bad input, reported to the user as one clear message (no traceback)."""
