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
    """A structure name that neither the built-in catalogue nor any loaded support set defines; the
    message lists the names that are known, so a typo is easy to see."""

    code = "unknown-structure"


class NoSupportSetError(AutocontourError):
    """A known structure without a support set to segment it with."""

    code = "no-support-set"


class SupportSetError(AutocontourError):
    """A support set that cannot be trusted or built: missing files, an invalid manifest, a content hash
    that no longer matches (modified after it was built), or cases that cannot make one."""

    code = "invalid-support-set"


class KnownScanError(SupportSetError):
    """A case whose scan the support set already has (the same fingerprint, however it is stored): a
    duplicate would count one patient twice."""

    code = "known-scan"
    http_status = 409


class SupportSetBusyError(SupportSetError):
    """Another addition to the same support set holds it for longer than an addition should take."""

    code = "support-set-busy"
    http_status = 503


class NotApprovedError(AutocontourError):
    """A result offered as a support case before a clinician approved it (or approved that structure)."""

    code = "not-approved"
    http_status = 409


class WeightsError(AutocontourError):
    """No checkpoint, or one that does not fit the network (missing, unexpected or mis-shaped keys)."""

    code = "invalid-weights"


class OptionError(AutocontourError):
    code = "invalid-option"  # an option out of range or not among its choices; the message names it
