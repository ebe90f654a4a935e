"""Environments synthesized from traffic: task families, replayable prompt pools (train / held-out by
time, near-duplicates kept on one side), synthetic variants, stored with versions and manifests.

Nothing heavy at import: the embedding model loads on first use.
"""

from learner.environments.build import EnvironmentSet, EnvironmentSettings, build_environments

__all__ = ["EnvironmentSet", "EnvironmentSettings", "build_environments"]
