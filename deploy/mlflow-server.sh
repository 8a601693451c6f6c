#!/bin/bash
# The MLflow tracking server with basic auth. Its ini is written here from the environment
# (LLMOPS_MLFLOW_ADMIN_PASSWORD), mode 0600, outside the image and the repository.
set -euo pipefail
umask 077
ini=/tmp/mlflow-basic-auth.ini
cat > "$ini" <<INI
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg://mlflow:${MLFLOW_DB_PASSWORD}@postgres:5432/mlflow
admin_username = admin
admin_password = ${MLFLOW_TRACKING_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$ini"
exec mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000 \
    --backend-store-uri "postgresql+psycopg://mlflow:${MLFLOW_DB_PASSWORD}@postgres:5432/mlflow" \
    --artifacts-destination /mlartifacts
