"""Exceptions raised by gradsurgery."""


class SolverError(RuntimeError):
    """A weight solver failed: the backend reported a non-optimal status, or the answer it returned is
    non-finite or infeasible. The message names the problem and the solver status."""


class SolverFallbackWarning(UserWarning):
    """A method's solver failed; the warning names the fallback the step used instead."""
