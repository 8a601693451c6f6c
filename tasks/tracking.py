"""Tracking: the MLflow client every stage asks (runs, the model registry, aliases).

Importing this module costs nothing; `mlflow` is imported on the first call. The store is
tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded stack's MLflow server when it runs
for this root, else a SQLite file under var/mlflow/.
"""

from __future__ import annotations

import os

from tasks.config import Settings
from tasks.credentials import export_file_secret
from tasks.procs import alive


def tracking_uri(settings: Settings) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the stack's MLflow server when it runs for this root (its
    experiments keep artifacts behind the server, mlflow-artifacts:/), else the SQLite store under var/."""
    if settings.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return settings.tracking.uri or os.environ["MLFLOW_TRACKING_URI"]
    if alive(settings, "mlflow"):
        return f"http://{settings.stack.host}:{settings.stack.mlflow_port}"
    return f"sqlite:///{settings.paths.var_dir / 'mlflow' / 'mlflow.db'}"


def mlflow_client(settings: Settings):
    """A client bound to this config's tracking URI. Never `mlflow.set_tracking_uri`: it also
    rewrites $MLFLOW_TRACKING_URI for the whole process, leaking one caller's store into the next."""
    import mlflow

    # docker-compose.yml hands the worker its MLflow password as a file; MLflow's client reads the variable
    export_file_secret("MLFLOW_TRACKING_PASSWORD")
    return mlflow.MlflowClient(tracking_uri=tracking_uri(settings))


def experiment_id(client, settings: Settings) -> str:
    name = settings.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = tracking_uri(settings)
    artifacts = None if uri.startswith("http") else (settings.paths.var_dir / "mlflow" / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)
