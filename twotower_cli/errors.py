"""The project's exceptions. The CLI layer turns each into one line on stderr and an exit code."""


class TwotowerError(Exception):
    """A failure the user can act on. ``str(err)`` is the whole message: what, where, what to do."""

    exit_code = 1


class ConfigError(TwotowerError):
    pass


class DataError(TwotowerError):
    pass


class ArtifactError(TwotowerError):
    """A run folder, model or index file that is missing, corrupt or incompatible."""


class TrainingError(TwotowerError):
    pass


class UsageError(TwotowerError):
    """A bad combination of options, found after parsing (parse errors are Typer's, exit 2)."""

    exit_code = 2
