"""Errors that mean "the input is wrong", as opposed to a bug.

The CLI turns them into one line and exit code 2; the server into a 4xx
problem+json response whose `type` is the error's `code`.
"""


class AutocontourError(ValueError):
    """Base for errors a user can fix; the message names what is wrong."""

    code = "invalid-input"
    http_status = 422


class InputImageError(AutocontourError):
    """The CT (or mask) given is not usable: unreadable, wrong shape, not CT-like."""

    code = "invalid-image"


class UnknownStructureError(AutocontourError):
    code = "unknown-structure"


class NoSupportSetError(AutocontourError):
    """A known structure without a support set to segment it with."""

    code = "no-support-set"


class SupportSetError(AutocontourError):
    code = "invalid-support-set"


class WeightsError(AutocontourError):
    code = "invalid-weights"


class OptionError(AutocontourError):
    code = "invalid-option"
