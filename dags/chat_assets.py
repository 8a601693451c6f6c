"""Airflow Assets shared between DAGs: chat_ingest produces them, chat_train consumes them."""

from airflow.sdk import Asset

CLEAN_CORPUS = Asset(name="chat_clean_corpus", uri="file:///llmops/data/clean", group="llmops")
CHAT_SHARDS = Asset(name="chat_shards", uri="file:///llmops/data/shards", group="llmops")
CHAT_CHALLENGER = Asset(name="chat_challenger", uri="mlflow://chat-gpt/challenger", group="llmops")
