"""The one error type a data owner sees: a single line that names the problem and the fix."""


class FedsiteError(Exception):
    """A user-facing error; the message says what is wrong and what to do about it."""
