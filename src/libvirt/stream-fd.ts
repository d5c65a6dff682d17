/**
 * A migration stream out of a libvirt domain's QEMU, handed over as a file descriptor.
 *
 * libvirt's QEMU runs as `libvirt-qemu` and cannot open tlc's private sockets. So tlc opens the
 * channel itself and gives QEMU one end, the way libvirt does for `virsh save`:
 *
 *   1. listen on a unix socket in a fresh 0700 directory, connect a client to it, accept;
 *   2. `virsh qemu-monitor-command DOM --pass-fds 3 '{"execute":"getfd","arguments":{"fdname":N}}'`
 *      with the client end as the child's fd 3: libvirt passes it to QEMU with the command;
 *   3. close the client end here (QEMU holds its own copy) and remove the socket and directory;
 *   4. `migrate` with `uri: "fd:N"`: QEMU writes the stream into its copy, and tlc reads it from
 *      the accepted end, which sees EOF when QEMU closes the descriptor at the end of the migration.
 *
 * Node stops reading a socket it passes to a child as stdio; only the client end is passed, and it
 * is never read here.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpError, errorText } from '../core/errors.js';
import type { MigrationInfo, MigrationParameters } from '../qmp/types.js';
import type { LibvirtMonitor } from './monitor.js';

export const DEFAULT_FDNAME = 'tlcmig';
const FDNAME_RE = /^[A-Za-z][A-Za-z0-9_-]{0,63}$/;
/** QEMU's largest max-bandwidth in bytes/s; QEMU restarted by libvirt is at 128 MiB/s. */
export const UNLIMITED_BANDWIDTH = 2 ** 53 - 1;

export interface MigrationChannel {
  /** The name QEMU knows the descriptor by. */
  readonly fdname: string;
  /** The `migrate` URI for it: `fd:<fdname>`. */
  readonly uri: string;
  /** tlc's end: the stream arrives here; it ends when QEMU closes its descriptor. */
  readonly readable: net.Socket;
  /** Destroys tlc's end and, unless a migration consumed it, removes the descriptor from QEMU. */
  close(): Promise<void>;
}

export interface OpenChannelOptions {
  fdname?: string;
  /** Where the short-lived rendezvous socket is made (a private directory inside); default os.tmpdir(). */
  dir?: string;
  timeoutMs?: number;
}

/** Opens a channel and hands its sending end to the domain's QEMU as `fdname`. */
export async function openMigrationChannel(
  monitor: LibvirtMonitor,
  opts: OpenChannelOptions = {},
): Promise<MigrationChannel> {
  const fdname = opts.fdname ?? DEFAULT_FDNAME;
  if (!FDNAME_RE.test(fdname))
    throw new QmpError('E_QMP_EXECUTE', `Bad descriptor name "${fdname}" for getfd`);
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const dir = await mkdtemp(join(opts.dir ?? tmpdir(), 'tlc-libvirt-'));
  let server: net.Server | undefined;
  let client: net.Socket | undefined;
  let accepted: net.Socket | undefined;
  try {
    const path = join(dir, 'mig.sock');
    server = net.createServer();
    const acceptedP = new Promise<net.Socket>((resolve, reject) => {
      server?.once('connection', resolve);
      server?.once('error', reject);
    });
    await new Promise<void>((resolve, reject) => {
      server?.once('error', reject);
      server?.listen(path, resolve);
    });
    client = net.createConnection({ path });
    await new Promise<void>((resolve, reject) => {
      client?.once('connect', resolve);
      client?.once('error', reject);
    });
    accepted = await acceptedP;
    await monitor.executeRaw('getfd', { fdname }, { timeoutMs, fds: [client] });
  } catch (err) {
    accepted?.destroy();
    throw err instanceof QmpError
      ? err
      : new QmpError(
          'E_QMP_EXECUTE',
          `Cannot hand a migration channel to ${monitor.path}: ${errorText(err)}`,
          {
            cause: err,
          },
        );
  } finally {
    client?.destroy();
    server?.close();
    await rm(dir, { recursive: true, force: true });
  }
  const readable = accepted;
  let consumed = false;
  readable.once('end', () => {
    consumed = true;
  });
  return {
    fdname,
    uri: `fd:${fdname}`,
    readable,
    async close() {
      readable.destroy();
      if (consumed || monitor.closed) return;
      // QEMU closes a descriptor a migration used; one never used stays until `closefd`.
      await monitor.executeRaw('closefd', { fdname }).catch(() => undefined);
    },
  };
}

export interface FdMigrationOptions {
  /** Every chunk of the stream, in order. */
  onData: (chunk: Buffer) => void;
  /** Stop the guest first and resume it afterwards (a stop-mode capture). Default true. */
  stop?: boolean;
  fdname?: string;
  timeoutMs?: number;
}

export interface FdMigrationResult {
  bytes: number;
  /** From `migrate` to the stream's EOF. */
  streamMs: number;
  /** The guest's pause, from `stop` to `cont` answered (stop mode only). */
  pausedMs?: number;
  info: MigrationInfo;
  /** Whether the guest was running before (stop mode resumes it only then). */
  wasRunning: boolean;
}

/**
 * One migration of the domain into `onData`: optionally `stop`, `migrate` to a passed descriptor
 * with unlimited bandwidth (the previous max-bandwidth is put back afterwards), read to EOF, check
 * that QEMU says `completed`, then `cont` if the guest was running. A building block for tests and
 * benchmarks; tlc's checkpoint drives the same steps with its own receiver.
 */
export async function migrateToFd(
  monitor: LibvirtMonitor,
  opts: FdMigrationOptions,
): Promise<FdMigrationResult> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const stopFirst = opts.stop ?? true;
  const status = await monitor.execute('query-status');
  const wasRunning = status.running;
  const before: MigrationParameters = await monitor.execute('query-migrate-parameters');
  const channel = await openMigrationChannel(monitor, { ...(opts.fdname ? { fdname: opts.fdname } : {}) });
  let bytes = 0;
  const eof = new Promise<void>((resolve, reject) => {
    channel.readable.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      try {
        opts.onData(chunk);
      } catch (err) {
        // The consumer refused the stream (a parse error): end the migration with its error.
        channel.readable.destroy(err instanceof Error ? err : new Error(String(err)));
      }
    });
    channel.readable.once('end', resolve);
    channel.readable.once('error', reject);
  });
  eof.catch(() => undefined);
  let stoppedAt: number | undefined;
  let resumed = false;
  try {
    await monitor.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BANDWIDTH });
    if (stopFirst && wasRunning) {
      stoppedAt = performance.now();
      await monitor.execute('stop');
    }
    const t0 = performance.now();
    await monitor.execute('migrate', { uri: channel.uri });
    await withTimeout(eof, timeoutMs, `the migration stream of ${monitor.path} did not end`);
    const streamMs = performance.now() - t0;
    const info = await settledMigration(monitor, timeoutMs);
    if (info.status !== 'completed') {
      throw new QmpError(
        'E_QMP_EXECUTE',
        `Migration of ${monitor.path} ended ${info.status ?? 'without a status'}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`,
      );
    }
    let pausedMs: number | undefined;
    if (stoppedAt !== undefined) {
      await resumeAfterMigration(monitor, timeoutMs);
      resumed = true;
      pausedMs = performance.now() - stoppedAt;
    }
    return { bytes, streamMs, info, wasRunning, ...(pausedMs !== undefined ? { pausedMs } : {}) };
  } catch (err) {
    await monitor.execute('migrate_cancel').catch(() => undefined);
    throw err;
  } finally {
    await channel.close();
    if (before['max-bandwidth'] !== undefined) {
      await monitor
        .execute('migrate-set-parameters', { 'max-bandwidth': before['max-bandwidth'] })
        .catch(() => undefined);
    }
    if (stoppedAt !== undefined && !resumed)
      await resumeAfterMigration(monitor, 10_000).catch(() => undefined);
  }
}

/** query-migrate until it leaves setup/active/device (the EOF can come just before `completed`). */
async function settledMigration(monitor: LibvirtMonitor, timeoutMs: number): Promise<MigrationInfo> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const info = await monitor.execute('query-migrate');
    const s = info.status;
    if (s !== 'setup' && s !== 'active' && s !== 'device' && s !== 'pre-switchover') return info;
    if (performance.now() > deadline)
      throw new QmpError('E_QMP_TIMEOUT', `Migration of ${monitor.path} did not settle`);
    await sleep(10);
  }
}

/**
 * `cont` after an outgoing migration; QEMU 7.2 refuses it ("Migration is not finalized yet") for a
 * moment after `completed`, so it is retried until the guest runs.
 */
export async function resumeAfterMigration(monitor: LibvirtMonitor, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      await monitor.execute('cont');
      return;
    } catch (err) {
      if (!(err instanceof QmpError) || err.code !== 'E_QMP_EXECUTE' || performance.now() > deadline)
        throw err;
      const s = await monitor.execute('query-status').catch(() => undefined);
      if (s?.running) return;
      await sleep(20);
    }
  }
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new QmpError('E_QMP_TIMEOUT', `${what} within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
