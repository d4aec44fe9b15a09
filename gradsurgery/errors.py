class SolverError(RuntimeError):
    pass
