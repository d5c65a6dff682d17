#!/bin/sh
# /init of the tlc test guest (busybox sh, runs as PID 1 from the initramfs).
# Picks the workload from the kernel command line (tlc.workload=<spec>) and runs it with
# its output on the serial console, where the host reads heartbeats. PID 1 must never
# exit (the kernel would panic), so after the workload ends we report and sleep forever.

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

is_num() {
  case "$1" in
    '' | *[!0-9]*) return 1 ;;
    *) return 0 ;;
  esac
}

# Split "kind:a:b" on colons into $1.. without globbing.
set -f
oldifs="$IFS"
IFS=:
set -- $spec
IFS="$oldifs"
set +f

cmd=
case "$1" in
  memverify)
    if [ $# -eq 2 ] && is_num "$2"; then
      cmd="/bin/memverify $2"
    elif [ $# -eq 3 ] && is_num "$2" && is_num "$3"; then
      cmd="/bin/memverify $2 $3"
    fi
    ;;
  dirty)
    if [ $# -eq 3 ] && is_num "$2"; then
      case "$3" in
        random | stream | hotcold) cmd="/bin/dirty $2 $3" ;;
      esac
    fi
    ;;
  idle)
    [ $# -eq 1 ] && cmd=/bin/idle
    ;;
esac

if [ -z "$cmd" ]; then
  echo "tlc-guest: bad workload $spec" >"$out"
else
  echo "tlc-guest: boot ok workload=$spec" >"$out"
  $cmd >"$out" 2>&1
  echo "tlc-guest: workload exited status=$?" >"$out"
fi

while :; do
  sleep 3600
done
