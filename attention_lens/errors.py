"""The one exception type for user mistakes: the CLI prints its message as a single line."""


class AttentionLensError(Exception):
    """A problem the user can fix (bad input, missing file, wrong pairing); message says what to do."""
