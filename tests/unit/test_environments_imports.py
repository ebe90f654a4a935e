"""The learner's data side stays light: importing it (and `onpolicy rewards` listing a table) must
not pull in torch, transformers, sklearn or the embedding model; those load when first used."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "sklearn", "sentence_transformers", "openai", "jsonschema")
MODULES = ("learner.types, learner.trajectories, learner.environments, learner.environments.build, "
           "learner.environments.families, learner.environments.pools, learner.environments.synth, "
           "learner.environments.store, learner.environments.embedding, learner.rewards, learner.rewards.build, "
           "learner.rewards.registry, learner.rewards.validation, learner.rewards.verifiers, learner.rewards.model, "
           "learner.rewards.memory, learner.rewards.reference, learner.rewards.judge, learner.rewards.combiner, learner.rewards.policy_head, "
           "learner.rewards_cli")


def test_no_heavy_imports():
    code = (
        "import sys, importlib\n"
        f"for m in '{MODULES}'.split(', '):\n"
        "    importlib.import_module(m)\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
