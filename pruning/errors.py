"""Exceptions raised for bad user input or failed computations.

Every message says what was asked for and what to do about it.
"""


class ToolkitError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class ConfigError(ToolkitError, ValueError):
    """A parameter is out of range or contradicts another one."""


class UnsupportedModelError(ToolkitError):
    """No adapter knows how to find the decoder or the visual tokens of this model."""


class CalibrationError(ToolkitError):
    """The calibration data cannot feed the requested statistics."""


class NumericalError(ToolkitError):
    """A computation failed numerically (e.g. a Hessian that is not positive definite)."""


class OutputExistsError(ToolkitError):
    """The output directory already holds a model and overwriting was not asked for."""


class InsufficientMemoryError(ToolkitError):
    """The memory plan of a run exceeds the memory available on a device."""


class ChatTemplateError(ToolkitError):
    """A model's chat template loops too long, is refused by the jinja sandbox, or raises."""
