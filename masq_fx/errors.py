"""The errors masq_fx raises for problems the caller can fix; each message names the problem and the fix.

Every such error derives from :class:`MasqFxError` (the command line prints it as one line) and from
the built-in exception it specialises (``ValueError``, ``FileNotFoundError``, …), so ``except
ValueError`` keeps working. Anything else that escapes is a bug and shows its traceback.
"""

from __future__ import annotations


class MasqFxError(Exception):
    """Base of every error masq_fx raises for a problem in its input, options, files or environment."""


class InputError(MasqFxError, ValueError):
    """An argument, option, config or file content masq_fx cannot use."""


class MissingFileError(MasqFxError, FileNotFoundError):
    """A file or folder masq_fx was pointed at does not exist."""


class OutputExistsError(MasqFxError, FileExistsError):
    """The output would replace existing files the caller did not ask to replace."""


class CalibrationMemoryError(InputError):
    """Calibration and the recipes would need more memory than is available."""


class CoverageWarning(UserWarning):
    """The calibration samples lack a modality (or its second moments) that the recipe would use."""
