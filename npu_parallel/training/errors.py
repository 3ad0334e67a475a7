"""What a run reports to its user instead of a traceback, and the exit codes (training and `npu-parallel` alike)."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 1, 2, 3


class ConfigError(ValueError):
    """A mistake in the arguments or inputs of a run (value, rule, fix in one line): exit code 2.

    Raised on every rank alike, before any collective a rank could be left waiting in.
    """


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses or gradient norms, or non-finite weights: exit code 3.

    Every rank decides it from the same world-reduced flag, so every rank raises it at the same step.
    """
