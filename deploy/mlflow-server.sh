#!/bin/bash
# The MLflow tracking server with basic auth, as docker-compose.yml runs it. Its secrets are files
# under /run/secrets/ (granted to this service only); they reach MLflow through its basic-auth ini
# (mode 0600, outside the image and the repository) and its environment, never through an argv.
# Host headers MLflow answers: $MLFLOW_SERVER_ALLOWED_HOSTS (set in docker-compose.yml).
set -euo pipefail
here=$(dirname "$0")
secret() { sh "$here/secret.sh" "/run/secrets/$1"; }
db_password=$(secret mlflow_db_password)
admin_password=$(secret mlflow_admin_password)
MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret mlflow_flask_secret)
MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://mlflow:${db_password}@postgres:5432/mlflow"
export MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_BACKEND_STORE_URI
umask 077
ini=/tmp/mlflow-basic-auth.ini
cat > "$ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_BACKEND_STORE_URI}
admin_username = admin
admin_password = ${admin_password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$ini"
exec mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000 --artifacts-destination /mlartifacts
