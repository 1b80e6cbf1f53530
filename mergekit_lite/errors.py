"""Typed errors. Each message names the file, tensor or recipe field, what was found, and what to do."""

from __future__ import annotations


class MergeKitLiteError(Exception):
    """Any failure a user can cause; the CLI prints it on one line and exits with code 2."""


class RecipeError(MergeKitLiteError):
    """The recipe is malformed or asks for something unsupported; ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class CheckpointError(MergeKitLiteError):
    """A checkpoint is missing, unreadable, corrupt, or incompatible with the others."""


class OutputError(MergeKitLiteError):
    """The output location cannot be written (exists without --force, disk full, ...)."""


class CollectionError(MergeKitLiteError):
    """A compressed collection is incomplete, corrupted, or asked for something it does not hold."""


class MergeKitLiteWarning(UserWarning):
    """Something a user should know about a finished output (no tokenizer, module weights copied unmerged, ...);
    the CLI prints each as one ``warning:`` line."""
