/**
 * Guards a background snapshot against tlc's own death. QEMU 7.2 freezes the guest for good when
 * a background snapshot fails or is cancelled mid-stream (its write protection is never lifted),
 * and a SIGKILL of tlc would close the migration socket and do exactly that. tlc forks this
 * program before the stream starts and sends it a duplicate of QEMU's connection over the IPC
 * channel; it reads nothing while tlc lives, and once tlc is gone it drains the stream to its end
 * so QEMU completes the snapshot and the guest runs on. tlc kills it by pid when the checkpoint
 * is over.
 */
import type net from 'node:net';

// tlc passes its pid: it may die before this program has even started.
const parent = Number(process.argv[2]);
let stream: net.Socket | undefined;
let draining = false;

function drain(): void {
  if (draining) return;
  draining = true;
  if (!stream) process.exit(0);
  stream.on('data', () => undefined);
  stream.on('end', () => process.exit(0));
  stream.on('error', () => process.exit(0));
  stream.resume();
}

process.on('message', (message: unknown, handle: unknown) => {
  if (message !== 'stream' || !handle) return;
  stream = handle as net.Socket;
  if (draining) {
    draining = false;
    drain();
  } else {
    stream.pause();
  }
});
// The IPC channel closes when tlc dies; the parent pid check covers a death before it opened.
process.on('disconnect', drain);
if (process.ppid !== parent) drain();
const watch = setInterval(() => {
  if (process.ppid === parent) return;
  clearInterval(watch);
  drain();
}, 50);
