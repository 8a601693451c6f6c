"""Judging a trained model: the evaluation suite (evaluate.py, metrics.py), the gate (gate.py), the
quantized variants (quantize.py), the tiers report (tiers.py), the MLflow registry (registry.py),
the release steps chat_train runs after training (release.py), and bit-for-bit rebuilds
(reproduce.py)."""
