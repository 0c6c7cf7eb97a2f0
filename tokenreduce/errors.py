"""Exceptions raised by tokenreduce. Every message names the valid choices."""


class TokenReduceError(Exception):
    """Base class of every error tokenreduce raises on purpose."""


class PolicyError(TokenReduceError, ValueError):
    """A policy, stage, spec string or reducer parameter is malformed."""


class UnknownMethodError(PolicyError, KeyError):
    """A method name is not in the registry."""

    def __str__(self):  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class SiteError(PolicyError):
    """A stage names a site the adapter does not publish, or a reducer cannot run there."""


class UnsupportedModelError(TokenReduceError, TypeError):
    """No registered adapter recognises the model."""


def choices(items) -> str:
    """Format a list of valid choices for an error message."""
    items = list(items)
    return ", ".join(str(i) for i in items) if items else "(none)"
