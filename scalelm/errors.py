"""The error users can fix. The CLI prints its message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing file, a config typo, a mismatched checkpoint, an impossible request."""
