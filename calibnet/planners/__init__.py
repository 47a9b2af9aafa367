"""Experiment planning: the CalibPlanner (nnU-Net ExperimentPlanner subclass) and the domain splits."""
