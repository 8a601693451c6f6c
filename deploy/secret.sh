#!/bin/sh
# Print a secret that docker-compose.yml mounts under /run/secrets/, for Airflow's `AIRFLOW__..._CMD`
# options (and any process that takes a command instead of a value):
#
#   secret.sh /run/secrets/airflow_fernet_key                       -> the key
#   secret.sh /run/secrets/redis_password 'redis://:{}@redis:6379/0' -> the URL, the secret at {}
#
# Only the file's path is ever in an argv (cat's); the value goes to stdout with no trailing newline,
# because Airflow uses a command's output as it is. An unreadable or empty file fails, naming it.
set -eu
file=${1:?usage: secret.sh FILE [TEMPLATE]}
[ -r "$file" ] || { echo "secret.sh: cannot read $file (is the secret granted to this service?)" >&2; exit 1; }
value=$(cat "$file")
[ -n "$value" ] || { echo "secret.sh: $file is empty: set its variable in .env" >&2; exit 1; }
if [ $# -lt 2 ]; then
    printf '%s' "$value"
    exit 0
fi
template=$2
case $template in
    *'{}'*) printf '%s%s%s' "${template%%\{\}*}" "$value" "${template#*\{\}}" ;;
    *) echo "secret.sh: the template has no {} for the secret: $template" >&2; exit 1 ;;
esac
