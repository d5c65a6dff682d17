#!/bin/sh
# /init of the tlc test guest (busybox sh, runs as PID 1 from the initramfs).
# Picks the workload from the kernel command line (tlc.workload=<spec>) and runs it with
# its output on the serial console, where the host reads heartbeats. A spec may join
# diskverify with one memory workload, e.g. diskverify:0+memverify:32: both run at once.
# PID 1 must never exit (the kernel would panic), so after the workloads end we report and
# sleep forever.

export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Dotted parameters are not passed to init as arguments or environment: read /proc/cmdline.
spec=idle
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    tlc.workload=*) spec="${arg#tlc.workload=}" ;;
  esac
done

out=/dev/ttyS0
[ -c "$out" ] || out=/dev/console

# The virtio drivers are modules of the cloud kernel: load them (in dependency order, listed
# in load.order by the image builder) only when the VM has a virtio PCI device (vendor 0x1af4).
load_virtio_modules() {
  [ -f /lib/modules/load.order ] || return 0
  for vendor in /sys/bus/pci/devices/*/vendor; do
    [ -f "$vendor" ] && [ "$(cat "$vendor")" = 0x1af4 ] || continue
    for m in $(cat /lib/modules/load.order); do
      insmod "/lib/modules/$m.ko" || echo "tlc-guest: insmod $m failed" >"$out"
    done
    return 0
  done
}
load_virtio_modules

# No globbing from here on: workload specs are split on ':' and '+' as plain words.
set -f

is_num() {
  case "$1" in
    '' | *[!0-9]*) return 1 ;;
    *) return 0 ;;
  esac
}

# The command line for one workload "kind:a:b", or nothing.
workload_cmd() {
  local IFS=:
  set -- $1
  case "$1" in
    memverify)
      if [ $# -eq 2 ] && is_num "$2"; then
        echo "/bin/memverify $2"
      elif [ $# -eq 3 ] && is_num "$2" && is_num "$3"; then
        echo "/bin/memverify $2 $3"
      elif [ $# -eq 4 ] && is_num "$2" && is_num "$3" && [ "$4" = grow ]; then
        echo "/bin/memverify $2 $3 grow"
      fi
      ;;
    dirty)
      if [ $# -eq 3 ] && is_num "$2"; then
        case "$3" in
          random | stream | hotcold | bytes) echo "/bin/dirty $2 $3" ;;
        esac
      fi
      ;;
    diskverify)
      [ $# -eq 2 ] && is_num "$2" && echo "/bin/diskverify $2"
      ;;
    idle)
      [ $# -eq 1 ] && echo /bin/idle
      ;;
  esac
}

# The parts of a spec, one a line ("diskverify:0+memverify:32": two lines).
spec_parts() {
  local IFS=+
  for part in $1; do
    echo "$part"
  done
}

# Check every part of the spec before starting any.
bad=
for part in $(spec_parts "$spec"); do
  [ -n "$(workload_cmd "$part")" ] || bad=1
done

if [ -z "$(spec_parts "$spec")" ] || [ -n "$bad" ]; then
  echo "tlc-guest: bad workload $spec" >"$out"
else
  echo "tlc-guest: boot ok workload=$spec" >"$out"
  for part in $(spec_parts "$spec"); do
    cmd=$(workload_cmd "$part")
    (
      $cmd >"$out" 2>&1
      echo "tlc-guest: workload exited status=$?" >"$out"
    ) &
  done
  wait
fi

while :; do
  sleep 3600
done
