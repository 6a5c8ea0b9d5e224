"""Errors a user can act on: each names the file and row, the config key or the run directory at
fault."""

from __future__ import annotations


class PolyfastError(Exception):
    """Base class of polyfast's user-facing errors."""


class DataError(PolyfastError, ValueError):
    """Bad input data. ``str(err)`` reads ``path:row: message``."""

    def __init__(self, message: str, path: str | None = None, row: int | None = None):
        self.path, self.row, self.message = path, row, message
        where = ""
        if path is not None:
            where = f"{path}:{row}: " if row is not None else f"{path}: "
        super().__init__(where + message)


class ConfigError(PolyfastError, ValueError):
    """A bad config value. ``str(err)`` names the dotted key path."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config key '{key}': {message}")


class RunError(PolyfastError):
    """A run directory or checkpoint that cannot be used as asked (in use, holding another run,
    unloadable, disk full). ``str(err)`` names the path."""


class NonFiniteError(RunError):
    """Training met a non-finite loss or gradient norm (or parameters) and stopped."""

    def __init__(self, message: str, step: int | None = None):
        self.step = step
        super().__init__(message)


class Interrupted(RunError):
    """Training stopped by Ctrl-C (KeyboardInterrupt): where it was and what can resume it."""

    def __init__(self, step: int, total_steps: int, checkpoint: str | None):
        self.step, self.total_steps, self.checkpoint = step, total_steps, checkpoint
        where = (f"the last checkpoint is {checkpoint}" if checkpoint else
                 "no checkpoint was saved (train.save_every=N saves one every N steps)")
        super().__init__(f"interrupted at step {step} of {total_steps}; {where}")
