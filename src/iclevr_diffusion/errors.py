"""The one exception type users see.

Core code raises `IclevrError` with a single-line message that names what is wrong (a file, a flag,
a label) and how to fix it; the CLI prints it as `error: <message>` and exits with code 1.
"""


class IclevrError(Exception):
    """A problem with the user's input or environment, explained in one line."""

