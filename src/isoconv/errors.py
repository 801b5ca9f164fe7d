"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, impossible shape).

    The message must name the bad value or file and say what to do.
    """


class ConfigError(UserError, ValueError):
    """An invalid setting; also a ValueError so library callers can catch it as such."""


class Interrupted(UserError):
    """A graceful stop on a signal after a checkpoint: not an error; the process exits with 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
