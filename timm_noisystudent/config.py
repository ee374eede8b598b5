"""Run configuration: the one source of truth for a Noisy Student run.

This module sits at the bottom of the package; it imports nothing else from it.
"""


class UserError(Exception):
    """A mistake the user can fix. The CLI prints its one-line message and exits with code 2."""
