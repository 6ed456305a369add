"""What every `nbd-postcopy` subcommand module shares."""


class CommandError(Exception):
    """A failure the user can act on: printed as one clear line, exit status 1, no traceback."""
