"""Airflow Assets shared between DAGs (chat_ingest produces them, chat_train consumes them), and
the config profiles the Trigger forms offer."""

import os

from airflow.sdk import Asset

PROFILES = ["tiny", "small", "gpt2-124m", "prod-local"]
# the profile the stack was started with (`llmops stack up --profile ...` sets it for every Airflow process)
DEFAULT_PROFILE = os.environ.get("LLMOPS_PROFILE", "tiny") if os.environ.get("LLMOPS_PROFILE") in PROFILES else "tiny"

CLEAN_CORPUS = Asset(name="chat_clean_corpus", uri="file:///llmops/data/clean", group="llmops")
CHAT_SHARDS = Asset(name="chat_shards", uri="file:///llmops/data/shards", group="llmops")
CHAT_CHALLENGER = Asset(name="chat_challenger", uri="mlflow://chat-gpt/challenger", group="llmops")
