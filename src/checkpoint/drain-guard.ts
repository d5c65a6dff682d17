/**
 * Guards a background snapshot against tlc's own death. QEMU 7.2 freezes the guest for good when
 * a background snapshot fails or is cancelled mid-stream (its write protection is never lifted),
 * and a SIGKILL of tlc would close the migration socket and do exactly that. tlc starts this
 * program with a duplicate of the socket as stdin; it reads nothing while tlc lives, and once
 * tlc is gone it drains the stream to its end so QEMU completes the snapshot and the guest runs
 * on. tlc kills it by pid when the checkpoint is over.
 */
// tlc passes its pid: it may die before this program has even started.
const parent = Number(process.argv[2]);

function drain(): void {
  const stream = process.stdin;
  stream.on('data', () => undefined);
  stream.on('end', () => process.exit(0));
  stream.on('error', () => process.exit(0));
  stream.resume();
}

if (process.ppid !== parent) {
  drain();
} else {
  const watch = setInterval(() => {
    if (process.ppid === parent) return;
    clearInterval(watch);
    drain();
  }, 50);
}
