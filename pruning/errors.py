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


class OutputWriteError(ToolkitError):
    """An output could not be written for lack of room (full disk, file size limit, quota, read-only)."""


class ForwardError(ToolkitError):
    """The model's own forward refused inputs built by its own processor (its files disagree about a size)."""


class HubError(ToolkitError):
    """The Hugging Face Hub cannot take an upload (switched off, unreachable, no accepted token, failed)."""


class InsufficientMemoryError(ToolkitError):
    """The memory plan of a run exceeds the memory available on a device."""


class ChatTemplateError(ToolkitError):
    """A model's chat template loops too long, is refused by the jinja sandbox, or raises."""


def one_line(err: BaseException) -> str:
    """An exception's message on one line, cut to a readable length (for a refusal that quotes it)."""
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def forward_failed(err: BaseException, what: str) -> ForwardError:
    """The one line for a model forward that raised on inputs its own processor built (``what``: e.g.
    'calibration batch 3')."""
    return ForwardError(f"the model's forward failed on {what} ({type(err).__name__}: {one_line(err)}): its config, "
                        "weights and processor files disagree (an edited config or preprocessor, or another model's "
                        "processor?); fix or re-download the model folder")
