"""The errors users can fix. The CLI prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing file, a config typo, a mismatched checkpoint, an impossible request."""


class CheckpointError(UserError):
    """A checkpoint or model directory that is missing, corrupt, or does not match the model."""
