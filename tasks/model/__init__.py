"""The model: the GPT (gpt.py), the chat template that turns messages into tokens (chat_template.py),
the serving prefix cache (prefix_cache.py), and the packaged encoders the judges use (encoders.py).

Nothing here imports from the rest of `tasks`: an export copies gpt.py, chat_template.py and
prefix_cache.py into the Triton model repository, where they run on their own.
"""
