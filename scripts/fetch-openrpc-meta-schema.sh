#!/bin/sh
# Fetches the OpenRPC meta-schema (npm package @open-rpc/meta-schema, pinned
# version and checksum) into target/openrpc-meta-schema.json, where
# tests/openrpc.rs reads it. It is a third-party file, so it is fetched, not
# kept in the repository. Needs npm, node, tar and sha1sum.
set -eu

version=1.14.9
sha1=a2f834adf74d309fa19fead7f9484e0243dc337b
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/openrpc-meta-schema.json"

if [ -s "$out" ]; then
    echo "OpenRPC meta-schema already at $out"
    exit 0
fi
for tool in npm node tar sha1sum; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "fetch-openrpc-meta-schema: $tool is needed (Debian: apt-get install nodejs npm)" >&2
        exit 1
    }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
(cd "$tmp" && npm pack --silent "@open-rpc/meta-schema@$version" >/dev/null)
tarball="$tmp/open-rpc-meta-schema-$version.tgz"
got=$(sha1sum "$tarball" | cut -d' ' -f1)
if [ "$got" != "$sha1" ]; then
    echo "fetch-openrpc-meta-schema: checksum mismatch for $tarball: $got, expected $sha1" >&2
    exit 1
fi
tar -xzf "$tarball" -C "$tmp"
mkdir -p "$root/target"
node -e '
const doc = require(process.argv[1]).openrpcDocument;
if (!doc || typeof doc !== "object") throw new Error("index.js exports no openrpcDocument");
process.stdout.write(JSON.stringify(doc, null, 2) + "\n");
' "$tmp/package/index.js" >"$out.tmp"
mv "$out.tmp" "$out"
echo "OpenRPC meta-schema $version written to $out"
