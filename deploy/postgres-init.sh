#!/bin/bash
# First start of the postgres container (/docker-entrypoint-initdb.d/, run as the superuser): one
# login role per database, owning only that database and allowed to connect only to it; none of
# them is a superuser or may create roles or databases. The superuser (postgres) is for this
# script and an operator, never for a service. Passwords are read by psql itself from the secret
# files under /run/secrets/ (a psql backtick runs `cat FILE`), so they are in no argv.
# Session memory's database gets the pgvector extension here (creating it needs the superuser).
set -euo pipefail
for name in airflow mlflow memory; do
    f=/run/secrets/${name}_db_password
    if [[ ! -s $f ]]; then
        echo "postgres-init: $f is missing or empty: set ${name^^}_DB_PASSWORD in .env" >&2
        exit 1
    fi
done
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\set af_pw `cat /run/secrets/airflow_db_password`
\set ml_pw `cat /run/secrets/mlflow_db_password`
\set mem_pw `cat /run/secrets/memory_db_password`
REVOKE ALL ON DATABASE postgres FROM PUBLIC;
CREATE ROLE airflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'af_pw';
CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'ml_pw';
CREATE ROLE memory LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'mem_pw';
CREATE DATABASE airflow OWNER airflow;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE memory OWNER memory;
REVOKE ALL ON DATABASE airflow, mlflow, memory FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE airflow TO airflow;
GRANT CONNECT, TEMPORARY ON DATABASE mlflow TO mlflow;
GRANT CONNECT, TEMPORARY ON DATABASE memory TO memory;
\connect memory
CREATE EXTENSION IF NOT EXISTS vector;
SQL
