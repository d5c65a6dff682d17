import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpError, TlcError, VmError, errorText } from '../core/errors.js';
import { PRIVATE_FILE_MODE } from '../core/paths.js';
import { QmpClient } from '../qmp/client.js';
import { type ProcessIdentity, identify, isAlive, kill, waitExit } from './process.js';
import { type LaunchArgs, type VmSpec, qemuArgv } from './spec.js';

export interface LaunchedQemu {
  process: ProcessIdentity;
  qmp: QmpClient;
  /** ms from spawn until QMP answered. */
  qmpReadyMs: number;
  spawnedAt: number;
}

/** Last non-empty lines QEMU printed: the one-line reason when it refuses to start. */
export function qemuLogTail(logFile: string, lines = 1): string {
  try {
    const text = fs.readFileSync(logFile, 'utf8').trim();
    return text.split('\n').filter(Boolean).slice(-lines).join(' | ');
  } catch {
    return '';
  }
}

/**
 * Starts QEMU detached from tlc (it outlives the CLI) and connects to its QMP socket. If QEMU exits
 * before QMP answers, throws E_VM_START with QEMU's own last message.
 */
export async function launchQemu(
  spec: VmSpec,
  launch: LaunchArgs,
  opts: { logFile: string; timeoutMs?: number },
): Promise<LaunchedQemu> {
  const timeoutMs = opts.timeoutMs ?? 15_000;
  const argv = qemuArgv(spec, launch);
  const logFd = fs.openSync(opts.logFile, 'w', PRIVATE_FILE_MODE);
  const spawnedAt = performance.now();
  // QEMU creates sockets and RAM files holding guest memory: owner-only, whoever calls us.
  const umask = process.umask(0o077);
  let child;
  try {
    child = spawn(spec.qemu.binary, argv, { detached: true, stdio: ['ignore', logFd, logFd] });
  } finally {
    process.umask(umask);
  }
  fs.closeSync(logFd);
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  child.unref();
  const pid = child.pid;
  const id = pid === undefined ? undefined : identify(pid);
  if (!id) {
    const err = await Promise.race([spawnError, sleep(200).then(() => undefined)]);
    throw new VmError(
      'E_VM_START',
      `Cannot start ${spec.qemu.binary}: ${err ? errorText(err) : qemuLogTail(opts.logFile)}`,
    );
  }
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!isAlive(id)) {
      throw new VmError(
        'E_VM_START',
        `QEMU exited during start: ${qemuLogTail(opts.logFile) || 'no message'}`,
      );
    }
    if (fs.existsSync(launch.qmpSocket)) {
      try {
        const qmp = await QmpClient.connect(launch.qmpSocket, {
          timeoutMs: Math.max(1000, deadline - Date.now()),
        });
        return { process: id, qmp, qmpReadyMs: performance.now() - spawnedAt, spawnedAt };
      } catch (err) {
        const retryable = err instanceof QmpError && err.code === 'E_QMP_CONNECT';
        // A QEMU that closes QMP mid-handshake is usually exiting: report its own reason.
        if (!retryable && (await waitExit(id, 500))) {
          throw new VmError(
            'E_VM_START',
            `QEMU exited during start: ${qemuLogTail(opts.logFile) || 'no message'}`,
          );
        }
        if (!retryable) {
          kill(id);
          throw err;
        }
      }
    }
    if (Date.now() >= deadline) {
      kill(id);
      await waitExit(id, 2000);
      throw new VmError('E_VM_START', `QEMU did not open its QMP socket within ${timeoutMs} ms`);
    }
    await sleep(10);
  }
}

/** Error to raise while waiting on a VM whose process may have died. */
export function deathCheck(id: ProcessIdentity, logFile: string, what: string): () => TlcError | undefined {
  return () =>
    isAlive(id)
      ? undefined
      : new VmError('E_VM_DIED', `QEMU exited ${what}: ${qemuLogTail(logFile) || 'no message'}`);
}
