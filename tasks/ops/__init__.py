"""Operating the whole: the `llmops` CLI (cli/), the embedded stack (stack.py) and its Airflow REST
client (airflow_client.py), `make run`'s lifecycle (lifecycle.py), `llmops status` (status.py) and the
reports index (reports.py)."""
