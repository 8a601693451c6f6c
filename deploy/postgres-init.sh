#!/bin/bash
# First start of the postgres container: MLflow's own role and database (Airflow's are the image's
# POSTGRES_USER/POSTGRES_DB), and the session-memory database with the pgvector extension (the
# gateway creates its table). The password comes from the container's environment.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE memory OWNER airflow;
\connect memory
CREATE EXTENSION IF NOT EXISTS vector;
SQL
