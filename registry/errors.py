"""Typed errors: the library raises these, the CLI turns them into one line and an exit code."""

from __future__ import annotations

from dataclasses import dataclass


class RegistryError(Exception):
    """Base class for every error the CLI reports as one line without a traceback."""

    exit_code = 1
    # True where the message is several one-line messages joined by "\n" (each is printed as an error line);
    # otherwise a line break in it comes from a quoted value and is shown escaped.
    multiline = False

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(RegistryError):
    """The command line itself is wrong: a missing file, an incompatible flag."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One problem found in a recipe, located at a node of its YAML document."""

    file: str
    line: int
    col: int
    loc: str
    message: str

    def __str__(self) -> str:
        where = f"{self.loc}: " if self.loc else ""
        return f"{self.file}:{self.line}:{self.col}: {where}{self.message}"

    def to_dict(self) -> dict:
        """The problem as plain JSON-ready data."""
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "loc": self.loc,
            "message": self.message,
        }


class RecipeError(RegistryError):
    """A recipe is invalid; carries every problem found, each with file:line:col."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col))
        super().__init__("\n".join(str(p) for p in self.problems))


class SourceError(RegistryError):
    """A source model cannot be found, read, pinned or merged with the others."""

    multiline = True


class MergeError(RegistryError):
    """The merge itself failed."""


class SmokeError(RegistryError):
    """A smoke test could not run (not: a check failed, which is a result)."""


class EvalError(RegistryError):
    """An evaluation could not run (not: a gate failed, which is a result)."""


class CardError(RegistryError):
    """A model card could not be rendered, or would have leaked something."""


class CatalogError(RegistryError):
    """The catalog could not read its models or write the site."""


class PublishError(RegistryError):
    """A publish target refused or failed; nothing half-written is left behind."""


class VerifyError(RegistryError):
    """A published model cannot be verified at all: its repo or revision cannot be read (exit 3, "cannot verify")."""

    exit_code = 3


class ReportError(RegistryError):
    """A file one stage left for the next is corrupt, incomplete or of an unknown format version."""


class OlderReportError(ReportError):
    """A report in a format an earlier registry version wrote: readable by re-running its stage, not corrupt."""
