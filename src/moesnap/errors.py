"""moesnap's errors: one base class, caught once at the command-line edge.

Every error a user can cause (a bad file, a bad argument, a corrupt golden)
is a :class:`MoesnapError`.  The CLI prints ``str(err)`` on one line and exits
with code 2; nothing else in the package prints or exits.
"""

from __future__ import annotations


class MoesnapError(Exception):
    """Base class: something the user gave us is wrong (exit code 2)."""


class UsageError(MoesnapError):
    """A command-line argument or option value is invalid."""


class ModelFileError(MoesnapError):
    """A GGUF model file is missing, unreadable, malformed or unsupported."""


class GoldenError(MoesnapError):
    """A golden store, version, case or array is missing, corrupt or foreign."""


class ToleranceError(MoesnapError):
    """A tolerance setting is invalid."""
