"""Exceptions that carry a one-line, user-facing message."""


class MdmfError(Exception):
    """Base class: the CLI prints ``str(err)`` as one line (traceback only with --debug)."""


class ConfigError(MdmfError, ValueError):
    """Bad option values or combinations."""


class DatasetError(MdmfError):
    """Split files or video trees that cannot be used."""


class VideoReadError(MdmfError):
    """A video that cannot be decoded (missing, truncated, zero frames, unknown container)."""


class CacheError(MdmfError):
    """A cache that is missing, incomplete, or was made with different settings."""


class TrainingError(MdmfError):
    """Training that cannot go on: its loss or weights stopped being finite (what was kept is named)."""
