#!/bin/bash
# As the official image's entrypoint: every environment variable whose name
# looks like a setting (lower case, with a dot: discovery.type, node.name …)
# becomes `-E name=value`. DISABLE_SECURITY_PLUGIN and
# DISABLE_INSTALL_DEMO_CONFIG need nothing: this node has no security plugin.
set -e
settings=()
while IFS='=' read -r -d '' name value; do
    if [[ "$name" =~ ^[a-z0-9_]+\.[a-z0-9_.]+$ ]]; then
        settings+=("-E${name}=${value}")
    fi
done < <(env -0)
if [ "$1" = "opensearch" ]; then
    shift
    exec /usr/share/opensearch/bin/opensearch "${settings[@]}" "$@"
fi
exec "$@"
