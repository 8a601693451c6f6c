"""Serving: the Triton model server (triton.py), the model it runs (triton_model.py, copied into each
export), and the OpenAI-compatible gateway in front of it (gateway.py) with its parts: admission
control, the session context store, the runtime safety filter, request logs and metrics."""
