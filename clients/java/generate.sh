#!/bin/sh
# Java code from protos/ (Maven's generate-sources phase runs this with the
# path of buf): `buf generate` into target/generated-sources/buf, redone only
# when a proto, buf.gen.yaml or pom.xml changed since the last run, so that
# unchanged sources let the compiler skip the generated code (most of the
# build's time). Stale files of a removed proto go with the rest.
set -eu
buf="$1"
out=target/generated-sources/buf
stamp="$out/.stamp"
if [ -f "$stamp" ] && [ -z "$(find ../../protos buf.gen.yaml pom.xml -newer "$stamp" \
    \( -name '*.proto' -o -name buf.gen.yaml -o -name pom.xml \) | head -n 1)" ]; then
    exit 0
fi
rm -rf "$out"
"$buf" generate ../.. --template buf.gen.yaml
touch "$stamp"
