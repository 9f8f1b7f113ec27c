"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(ValueError):
    """A problem with the user's input (paths, images, shapes, checkpoints), with the fix in the message."""
