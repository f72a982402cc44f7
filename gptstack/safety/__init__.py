"""Deployment safety: attack suites and jailbreak wrappers, judges (refusal prefixes, the moderation
classifier, rule-based reward models graded by an LM), refusal-training data, and `gptstack safety eval`."""
