"""The one error hierarchy of compress.

Every message is one line: what failed, where, expected vs got, and the fix.
The CLI prints a CompressError as that line and exits 2 (GateFailed exits 1).
"""


class CompressError(Exception):
    """Base of every error a user can cause and fix."""

    exit_code = 2


class RecipeError(CompressError):
    """The recipe (compress.yaml) is malformed or names something unknown."""


class SourceError(CompressError):
    """A teacher or data source is missing, empty or of the wrong kind."""


class StageError(CompressError):
    """A stage ran but its result failed validation."""


class TargetError(CompressError):
    """A target cannot build on this machine or with this configuration."""


class CacheError(CompressError):
    """The stage cache or the build directory cannot be used as asked."""


class BenchError(CompressError):
    """A benchmark could not run."""


class GateFailed(CompressError):
    """A quality gate fell short; the build's artifacts and report are kept."""

    exit_code = 1
