"""llmops-chat: the lifecycle of a chat model as plain, testable stages.

Each stage module (`tasks.data.ingest`, `tasks.data.validate`, `tasks.data.snapshot`, `tasks.data.shard`, ...)
exposes one function that takes paths/ids and a typed config and returns a small JSON-able
dict. Nothing in this package imports Airflow; the DAGs in `dags/` only wire these together.
"""

__version__ = "0.1.0"
