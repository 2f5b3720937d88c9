"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class FeatspecError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""
