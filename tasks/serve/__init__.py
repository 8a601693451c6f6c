"""Serving: the Triton model repository (repository.py) and the export that fills it (export.py), the
Triton server (triton.py) and the model it runs (triton_model.py, copied into each export), the
OpenAI-compatible gateway in front of it (gateway/) with its parts (admission control, sessions,
memory, safety, tiers), the server lifecycle (server.py), the load generator and the batch tuner."""
