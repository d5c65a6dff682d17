import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { RestoreError, TlcError, errorText } from '../core/errors.js';
import { PRIVATE_DIR_MODE } from '../core/paths.js';
import type { QmpClient } from '../qmp/client.js';
import { CheckpointStore, type StoredCheckpoint } from '../store/store.js';
import { checkpointFilePath } from '../store/manifest.js';
import { assembleBlock, ramChain } from '../store/chain.js';
import { adoptScratchImage } from '../store/scratch.js';
import { loadSigningKey } from '../store/sign.js';
import { type VerifyReport, assertVerified, verifyCheckpoint } from '../store/verify.js';
import type { Accel } from '../vm/spec.js';
import { ConsoleTail } from '../vm/console.js';
import { deathCheck, launchQemu } from '../vm/launch.js';
import { isHeartbeatLine, qemuLogFile, type Log } from '../vm/manager.js';
import { kill, waitExit } from '../vm/process.js';
import { findQemu, listMachines } from '../vm/qemu.js';
import { restoreDisks } from '../disk/restore-disks.js';
import { restoreLibvirtDomain } from './libvirt-restore.js';
import {
  type VmRecord,
  claimVmName,
  runtimePaths,
  saveVm,
  tryLoadVm,
  vmDir,
  vmState,
} from '../vm/registry.js';
import { type VmSpec, ramBlockOf, validateVmName } from '../vm/spec.js';
import { assertCompatible } from './compat.js';
import { type SynthesisStats, synthesizeStream } from './synthesize.js';

export interface RestoreOptions {
  ref: string;
  store?: CheckpointStore;
  name?: string;
  /** Stream every page instead of mapping the RAM image (for when it cannot be mapped). */
  eager?: boolean;
  /** Re-hash the whole checkpoint before starting QEMU. */
  verify?: boolean;
  accel?: Accel;
  /**
   * Replay the QEMU arguments recorded in the checkpoint (extra args, an adopted command line)
   * when this host has no record of the VM. They are printed first; without this flag such a
   * checkpoint is refused, since arguments like `-netdev tap,script=...` run programs.
   */
  trustCheckpointArgs?: boolean;
  /** Directory for the restored VM's new disk overlays (default: the VM's own directory). */
  diskTarget?: string;
  /** HMAC key file (default `$TLC_SIGN_KEY` or the per-user key). */
  signKeyFile?: string;
  /** Restore a checkpoint without a signature although a key is configured. */
  allowUnsigned?: boolean;
  /** Also wait for the guest's first heartbeat after it runs. */
  waitHeartbeat?: boolean;
  timeoutMs?: number;
  log?: Log;
}

export interface RestoredVm {
  record: VmRecord;
  checkpoint: StoredCheckpoint;
  mode: 'lazy' | 'eager';
  /** QEMU process start until the guest runs again. */
  timeToRunningMs: number;
  /** QEMU process start until the first heartbeat (when waited for). */
  timeToHeartbeatMs?: number;
  stream: SynthesisStats;
}

/**
 * Starts the VM again from a checkpoint. Lazy (default): QEMU maps the checkpoint's RAM image
 * privately (copy-on-write), so the guest runs before its memory is read and the image stays
 * unchanged for later restores; only small blocks and device state are streamed in.
 */
export async function restoreCheckpoint(opts: RestoreOptions): Promise<RestoredVm> {
  const log = opts.log ?? (() => undefined);
  const store = opts.store ?? new CheckpointStore();
  const ckpt = store.resolve(opts.ref);
  const m = ckpt.manifest;
  const mode = opts.eager ? 'eager' : 'lazy';
  const signing = loadSigningKey({
    ...(opts.signKeyFile ? { keyFile: opts.signKeyFile } : {}),
    create: false,
  });
  // The checkpoint and every parent its disk layers build on are checked the same way.
  const verify = (c: StoredCheckpoint): VerifyReport => {
    const report = verifyCheckpoint(c, Boolean(opts.verify), {
      ...(signing ? { key: signing.key } : {}),
      allowUnsigned: Boolean(opts.allowUnsigned),
    });
    assertVerified(report);
    return report;
  };
  const report = verify(ckpt);
  // An incremental checkpoint's RAM is its chain's: every parent is checked the same way.
  const chain = ramChain(ckpt, (id) => store.exact(id));
  for (const parent of chain.slice(1)) {
    try {
      verify(parent);
    } catch (err) {
      if (err instanceof TlcError) err.message = `${ckpt.id} builds on ${parent.id}: ${err.message}`;
      throw err;
    }
  }
  if (report.signature === 'unsigned')
    log(`${ckpt.id} is unsigned: its origin is not checked (restoring as --allow-unsigned says)`);
  if (report.signature === 'no-key')
    log(`${ckpt.id} is signed, but no signing key is configured here: its signature is not checked`);
  // Always this host's QEMU: a checkpoint is data and never names the program that runs it.
  const qemu = await findQemu();
  assertCompatible(m, qemu, await listMachines(qemu.binary));
  if (m.vm.libvirt) {
    const r = await restoreLibvirtDomain(ckpt, {
      ...(opts.name ? { name: opts.name } : {}),
      trustCheckpointArgs: Boolean(opts.trustCheckpointArgs),
      log,
      timeoutMs: opts.timeoutMs ?? 120_000,
      store,
      verifyParent: verify,
      ramChain: chain,
      ...(opts.diskTarget ? { diskTarget: path.resolve(opts.diskTarget) } : {}),
    });
    return {
      record: r.record,
      checkpoint: ckpt,
      mode: 'eager',
      timeToRunningMs: r.timeToRunningMs,
      stream: r.stream,
    };
  }
  const name = validateVmName(opts.name ?? m.vm.name);
  claimVmName(name);

  const ramBlock = m.blocks.find((b) => b.name === ramBlockOf(m.vm));
  if (!ramBlock) throw new RestoreError('E_RESTORE', `${m.id} has no RAM block "${ramBlockOf(m.vm)}"`);
  const launchFacts = hostLaunchFacts(m, Boolean(opts.trustCheckpointArgs), log);
  let ramImage = checkpointFilePath(ckpt.dir, ramBlock.file);
  if (mode === 'lazy' && chain.length > 1) {
    // Lazy restore maps one flat image: the chain's newest version of every page, written once
    // into the VM's directory (sparse; only data pages are copied). It lives as long as the VM.
    const started = performance.now();
    ramImage = path.join(vmDir(name), 'ram.img');
    fs.rmSync(ramImage, { force: true });
    const index = m.blocks.indexOf(ramBlock);
    // The checkpointed VM's receive files may hold exactly this checkpoint (its newest, the VM
    // gone since): then they become the image, checked page by page against its hashes.
    const source = tryLoadVm(m.vm.name);
    const sourceIdle = !source || vmState(source) !== 'running';
    if (sourceIdle && adoptScratchImage(path.join(vmDir(m.vm.name), 'scratch'), ckpt, index, ramImage)) {
      log(
        `RAM image: ${m.vm.name}'s receive file, which holds ${ckpt.id} (${(performance.now() - started).toFixed(0)} ms)`,
      );
    } else {
      const bytes = assembleBlock(chain, index, ramImage);
      log(
        `assembled RAM from a chain of ${chain.length} checkpoints: ${(bytes / 2 ** 20).toFixed(1)} MiB in ${(performance.now() - started).toFixed(0)} ms`,
      );
    }
  }
  const spec: VmSpec = {
    ...m.vm,
    ...launchFacts,
    name,
    qemu,
    machine: m.machineType,
    accel: opts.accel ?? m.vm.accel,
    memory: mode === 'lazy' ? { kind: 'file', path: ramImage, share: false } : { kind: 'memfd' },
  };
  const disks = await restoreDisks({
    ckpt,
    store,
    targetDir: opts.diskTarget ? path.resolve(opts.diskTarget) : vmDir(name),
    vmName: name,
    log,
    verifyParent: verify,
  });
  if (disks.length > 0 && !spec.adoptedArgv) spec.disks = disks.map((d) => d.disk);
  const diskOverlays = Object.fromEntries(
    disks.filter((d) => d.original).map((d) => [d.original, d.disk.path]),
  );
  const overlays = disks.filter((d) => d.backedBy).map((d) => d.disk.path);
  const socketDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-restore-'));
  fs.chmodSync(socketDir, PRIVATE_DIR_MODE);
  const incoming = path.join(socketDir, 'incoming.sock');
  const paths = runtimePaths(name);
  const logFile = qemuLogFile(name);
  let launched;
  try {
    launched = await launchQemu(
      spec,
      {
        ...paths,
        incoming: `unix:${incoming}`,
        ...(m.disks?.some((d) => !d.captured) ? { keepAdoptedDisks: true } : {}),
        diskOverlays,
      },
      { logFile },
    );
  } catch (err) {
    for (const file of [socketDir, ...overlays]) fs.rmSync(file, { recursive: true, force: true });
    throw err;
  }
  const { qmp } = launched;
  const check = deathCheck(launched.process, logFile, 'while loading the checkpoint');
  try {
    const stream = await feedStream(ckpt, mode, incoming, check, chain);
    await waitLoaded(qmp, check, opts.timeoutMs ?? 60_000, m.vmWasRunning);
    const timeToRunningMs = performance.now() - launched.spawnedAt;
    log(`guest running ${timeToRunningMs.toFixed(0)} ms after QEMU started (${mode} restore)`);
    const record: VmRecord = {
      spec,
      paths,
      process: launched.process,
      startedAt: new Date().toISOString(),
      adopted: false,
      restoredFrom: ckpt.id,
    };
    saveVm(record);
    const result: RestoredVm = { record, checkpoint: ckpt, mode, timeToRunningMs, stream };
    if (opts.waitHeartbeat) {
      await new ConsoleTail(paths.consoleLog).waitFor(isHeartbeatLine, {
        timeoutMs: opts.timeoutMs ?? 60_000,
        check,
        onTimeout: () =>
          new RestoreError(
            'E_RESTORE',
            `Restored guest printed no heartbeat within ${opts.timeoutMs ?? 60_000} ms`,
          ),
      });
      result.timeToHeartbeatMs = performance.now() - launched.spawnedAt;
    }
    return result;
  } catch (err) {
    kill(launched.process);
    await waitExit(launched.process, 3000);
    // A VM that never ran leaves no disks behind; the checkpoint's own layers were never written.
    for (const file of overlays) fs.rmSync(file, { force: true });
    throw err instanceof TlcError
      ? err
      : new RestoreError('E_RESTORE', `Restore of ${ckpt.id} failed: ${errorText(err)}`, { cause: err });
  } finally {
    qmp.close();
    fs.rmSync(socketDir, { recursive: true, force: true });
  }
}

/**
 * What QEMU is told to run beyond the machine itself, taken from this host's record of the VM
 * when there is one; from the checkpoint only when the user says they trust it.
 */
function hostLaunchFacts(
  m: StoredCheckpoint['manifest'],
  trust: boolean,
  log: Log,
): Pick<VmSpec, 'extraArgs' | 'adoptedArgv' | 'kernel' | 'initrd'> {
  const local = tryLoadVm(m.vm.name);
  if (local) {
    const { extraArgs, adoptedArgv, kernel, initrd } = local.spec;
    return {
      extraArgs,
      ...(adoptedArgv ? { adoptedArgv } : {}),
      ...(kernel ? { kernel } : {}),
      ...(initrd ? { initrd } : {}),
    };
  }
  const recorded = [...(m.vm.adoptedArgv ?? []), ...m.vm.extraArgs];
  if (recorded.length > 0 && !trust) {
    throw new RestoreError(
      'E_UNTRUSTED',
      `${m.id} carries QEMU arguments (${summarizeArgs(recorded)}) and this host has no VM "${m.vm.name}" to take them from; ` +
        'check them with tlc show --json and pass --trust-checkpoint-args to run them',
    );
  }
  if (recorded.length > 0) log(`running QEMU with the checkpoint's arguments: ${recorded.join(' ')}`);
  return {
    extraArgs: m.vm.extraArgs,
    ...(m.vm.adoptedArgv ? { adoptedArgv: m.vm.adoptedArgv } : {}),
    ...(m.vm.kernel ? { kernel: m.vm.kernel } : {}),
    ...(m.vm.initrd ? { initrd: m.vm.initrd } : {}),
  };
}

function summarizeArgs(args: string[]): string {
  const text = args.join(' ');
  return text.length > 120 ? `${text.slice(0, 117)}...` : text;
}

async function feedStream(
  ckpt: StoredCheckpoint,
  mode: 'lazy' | 'eager',
  socketPath: string,
  check: () => Error | undefined,
  chain: readonly StoredCheckpoint[],
): Promise<SynthesisStats> {
  const socket = await connectWithRetry(socketPath, check);
  try {
    const stats = await synthesizeStream(
      ckpt,
      mode,
      async (chunk) => {
        if (!socket.write(chunk)) await drainOrClose(socket);
        if (socket.destroyed)
          throw check() ?? new RestoreError('E_RESTORE', 'QEMU closed the incoming connection');
      },
      chain,
    );
    socket.end();
    return stats;
  } catch (err) {
    socket.destroy();
    throw err;
  }
}

function drainOrClose(socket: net.Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}

async function connectWithRetry(socketPath: string, check: () => Error | undefined): Promise<net.Socket> {
  for (let attempt = 0; ; attempt++) {
    const dead = check();
    if (dead) throw dead;
    try {
      const socket = net.createConnection({ path: socketPath });
      await once(socket, 'connect');
      socket.on('error', () => undefined);
      return socket;
    } catch (err) {
      if (attempt > 500)
        throw new RestoreError('E_RESTORE', `QEMU never listened on ${socketPath}: ${errorText(err)}`);
      await sleep(5);
    }
  }
}

async function waitLoaded(
  qmp: QmpClient,
  check: () => Error | undefined,
  timeoutMs: number,
  resume: boolean,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const dead = check();
    if (dead) throw dead;
    const status = await qmp.execute('query-status');
    if (status.status === 'running') return;
    if (status.status === 'paused') {
      const info = await qmp.execute('query-migrate');
      if (info.status === 'completed') {
        // A stop-mode stream records the VM as paused; it was running when checkpointed.
        if (resume) await qmp.execute('cont');
        return;
      }
    }
    if (Date.now() > deadline)
      throw new RestoreError('E_RESTORE', `Guest not running ${timeoutMs} ms after start`);
    await sleep(2);
  }
}
