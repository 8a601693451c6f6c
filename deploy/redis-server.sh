#!/bin/sh
# Redis as docker-compose.yml runs it (as the image's redis user): the password comes from the secret
# file into a config file of mode 0600, so it is in no argv and no container environment.
set -eu
password=$(sh /opt/deploy/secret.sh /run/secrets/redis_password)
umask 077
conf=/tmp/redis.conf
printf 'requirepass "%s"\nsave 60 1\ndir /data\n' "$password" > "$conf"
exec redis-server "$conf"
