"""spin_operator: the kopf controller that turns SpinRuns into generation Jobs and training PyTorchJobs."""
