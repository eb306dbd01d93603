"""spin_core: the SpinRun spec, the artefact store, data loading, the planner and the job entry points."""

__version__ = "0.1.0"
