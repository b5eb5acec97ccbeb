#!/bin/sh
# As the official image's ci/docker-entrypoint.sh: flags alone run envoy;
# unless ENVOY_UID=0, envoy runs as the unprivileged user envoy.
set -e
if [ "${1#-}" != "$1" ]; then
    set -- envoy "$@"
fi
if [ "${ENVOY_UID:-101}" != "0" ] && [ "$(id -u)" = "0" ]; then
    exec setpriv --reuid="${ENVOY_UID:-101}" --regid="${ENVOY_GID:-101}" --clear-groups "$@"
fi
exec "$@"
