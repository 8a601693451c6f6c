"""One error base for every stage: what the CLI exits with and whether a retry can help.

A stage raises a subclass of `LlmopsError` for what it can name (bad input, a failed gate, a
server that did not answer). Two class attributes say what happens next:

    exit_code   the status `llmops` exits with (2 bad config; 1 bad data, a failed gate or a
                service that did not answer); the message goes to stderr, never a traceback
    retryable   whether running the same task again can succeed: an Airflow task fails at once on
                a verdict (retryable False: the input or the gate would say the same again) and
                is retried on the rest (a server that was restarting, a lock)

Anything else (a ValueError from a bug, a KeyError) is not ours: it propagates with its
traceback, so a bug never looks like bad input.
"""

from __future__ import annotations


class LlmopsError(Exception):
    """A failure the stage names; its message says what to do."""

    exit_code = 1
    retryable = False


class ConfigError(LlmopsError, ValueError):
    """A bad config value, override or profile: fails before any work starts, naming the key."""

    exit_code = 2


class InputError(LlmopsError, ValueError):
    """Bad input (a missing partition, a reject rate over the gate, a bad argument): a ValueError too."""


class VerdictError(LlmopsError):
    """A gate said no (validation, evaluation, promotion): the same inputs give the same verdict."""


class ServiceError(LlmopsError):
    """A server (Airflow, MLflow, Triton, a training rank) failed or did not answer: worth another try."""

    retryable = True
