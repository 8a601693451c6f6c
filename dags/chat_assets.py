"""What the DAGs share: the Airflow Assets (chat_ingest produces them, chat_train and chat_deploy run on
them), the config profiles the Trigger forms offer (configs/profiles/), and how a task's failure is
retried (`fails_fast`)."""

import functools
import os

from airflow.sdk import Asset

from tasks.profiles import profile_names

PROFILES = profile_names()
# the profile the stack was started with (`llmops stack up --profile ...` sets it for every
# Airflow process)
DEFAULT_PROFILE = (os.environ.get("LLMOPS_PROFILE", "tiny") if os.environ.get("LLMOPS_PROFILE") in PROFILES
                   else "tiny")

CLEAN_CORPUS = Asset(name="chat_clean_corpus", uri="file:///llmops/data/clean", group="llmops")
CHAT_SHARDS = Asset(name="chat_shards", uri="file:///llmops/data/shards", group="llmops")
CHAT_CHALLENGER = Asset(name="chat_challenger", uri="mlflow://chat-gpt/challenger", group="llmops")


def fails_fast(fn):
    """A task body whose stage errors decide the retry: an error that says a retry cannot help (bad input,
    a failed gate: `retryable` False in tasks/errors.py) fails the task on its first try with its message;
    a retryable one (a server that did not answer, a training rank that died) and any other exception
    go through the task's retries. Put it under `@task`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        from tasks.errors import LlmopsError

        try:
            return fn(*args, **kwargs)
        except LlmopsError as e:
            if e.retryable:
                raise
            raise AirflowFailException(f"{type(e).__name__}: {e}") from e

    return wrapper
