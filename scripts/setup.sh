#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: QEMU and a C compiler from Debian's packages,
# npm dependencies, the TypeScript build, and the bundled guest image (cached).
# --test also installs Debian's chromium, which renders the benchmark report in a test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
command -v gcc >/dev/null || need+=(gcc)
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [ "${1:-}" = "--test" ]; then
  [ -x /usr/bin/chromium ] || need+=(chromium)
  # libvirt 9.0 for test/integration/libvirt.test.ts, which starts its daemons by hand.
  # libvirt-daemon-system creates the libvirt-qemu user Debian's qemu.conf runs QEMU as; without
  # systemd as PID 1 its sysv flavour keeps apt from pulling in systemd.
  if ! command -v virsh >/dev/null || [ ! -x /usr/sbin/libvirtd ]; then
    need+=(libvirt-daemon-system)
    [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ] || need+=(libvirt-daemon-system-sysv)
  fi
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci" >&2
  npm ci --no-audit --no-fund >&2
fi

npm run -s build >&2
node bin/tlc.js guest build >&2
