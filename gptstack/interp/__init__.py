"""Interpretability: named hooks on the model (capture and patch), the logit and tuned lens, attention
heads (patterns, induction scores, ablation), direct logit attribution, activation patching, neurons and
sparse autoencoders, and the reports that show them (PNG, HTML, JSON)."""
