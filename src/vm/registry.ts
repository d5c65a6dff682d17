import fs from 'node:fs';
import path from 'node:path';
import { TlcError, isErrnoCode } from '../core/errors.js';
import { PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, vmsDir } from '../core/paths.js';
import { writeFileAtomic } from '../core/fsutil.js';
import { type ProcessIdentity, isAlive } from './process.js';
import { type RuntimePaths, type VmSpec, parseVmSpec, validateVmName } from './spec.js';

/** What tlc knows about one VM: its spec, where it talks, and which process runs it. */
export interface VmRecord {
  spec: VmSpec;
  paths: RuntimePaths;
  process?: ProcessIdentity;
  startedAt: string;
  /** tlc did not start it (attach): tlc never kills it on `stop`, it asks QEMU to quit. */
  adopted: boolean;
  /** Checkpoint this VM was restored from, if any. */
  restoredFrom?: string;
  /** A libvirt domain: its monitor is reached through libvirt (`qmpSocket` is then empty). */
  libvirt?: { domain: string; uri: string };
}

export type VmState = 'running' | 'stopped';

export function vmDir(name: string): string {
  return path.join(vmsDir(), validateVmName(name));
}

export function runtimePaths(name: string): RuntimePaths {
  const dir = vmDir(name);
  return {
    qmpSocket: path.join(dir, 'qmp.sock'),
    consoleLog: path.join(dir, 'console.log'),
    pidFile: path.join(dir, 'qemu.pid'),
  };
}

function recordFile(name: string): string {
  return path.join(vmDir(name), 'vm.json');
}

export function vmState(record: VmRecord): VmState {
  return record.process && isAlive(record.process) ? 'running' : 'stopped';
}

export function loadVm(name: string): VmRecord {
  const file = recordFile(name);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT'))
      throw new TlcError('E_VM_NOT_FOUND', `No VM named "${name}" (see: tlc vm ls)`);
    throw err;
  }
  const record = JSON.parse(text) as VmRecord;
  record.spec = parseVmSpec(record.spec, file);
  return record;
}

export function tryLoadVm(name: string): VmRecord | undefined {
  try {
    return loadVm(name);
  } catch (err) {
    if (err instanceof TlcError && err.code === 'E_VM_NOT_FOUND') return undefined;
    throw err;
  }
}

/** Creates the VM's private directory, refusing a name whose VM is still running. */
export function claimVmName(name: string): void {
  const existing = tryLoadVm(name);
  if (existing && vmState(existing) === 'running') {
    throw new TlcError(
      'E_VM_EXISTS',
      `A VM named "${name}" is already running (pid ${existing.process?.pid})`,
    );
  }
  const dir = vmDir(name);
  fs.mkdirSync(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  fs.chmodSync(dir, PRIVATE_DIR_MODE);
  const paths = runtimePaths(name);
  for (const stale of [paths.qmpSocket, paths.pidFile, paths.consoleLog]) fs.rmSync(stale, { force: true });
}

export function saveVm(record: VmRecord): void {
  writeFileAtomic(recordFile(record.spec.name), JSON.stringify(record, null, 2) + '\n', PRIVATE_FILE_MODE);
}

export function removeVm(name: string): void {
  fs.rmSync(vmDir(name), { recursive: true, force: true });
}

export function listVms(): VmRecord[] {
  let names: string[];
  try {
    names = fs.readdirSync(vmsDir());
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT')) return [];
    throw err;
  }
  const records: VmRecord[] = [];
  for (const name of names.sort()) {
    const record = tryLoadVm(name);
    if (record) records.push(record);
  }
  return records;
}
