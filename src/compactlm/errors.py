"""Errors that name the problem and the fix.

Every user-facing failure raises a subclass of :class:`CompactLMError` (itself a ``ValueError``), so the
CLI can print one clear line and exit with status 2 instead of a traceback from deep inside torch.
"""


class CompactLMError(ValueError):
    """Base class: a problem with the user's input, with a message that says what to change."""


class ConfigError(CompactLMError):
    """A config field has a value the method cannot use."""


class ModelLoadError(CompactLMError):
    """A model spec cannot be resolved or loaded (unknown name, missing file, corrupt checkpoint)."""


class UnsupportedArchitectureError(CompactLMError):
    """The model family has no architecture adapter."""


class DataError(CompactLMError):
    """A text or calibration source is missing or unusable."""


class CalibrationError(CompactLMError):
    """Calibration produced non-finite values or could not run."""
