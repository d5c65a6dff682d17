import fs from 'node:fs';
import { VmError } from '../core/errors.js';
import type { Monitor } from '../qmp/monitor.js';
import type { ProcessIdentity } from './process.js';
import type { Accel, MemoryBackend } from './spec.js';

/** Where a running QEMU keeps main guest RAM, learned over QMP (never from its command line). */
export interface MemoryLayout {
  /** The memory backend's id, which is also the RAM block's name in the migration stream. */
  ramBlock: string;
  memory: MemoryBackend;
  memMiB: number;
}

export async function memoryLayout(qmp: Monitor): Promise<MemoryLayout> {
  const link = await qmp.execute('qom-get', { path: '/machine', property: 'memory-backend' });
  const ramBlock = typeof link === 'string' ? link.replace(/^\/objects\//, '') : '';
  if (!ramBlock) throw new VmError('E_VM_SPEC', 'QEMU does not say which memory backend holds guest RAM');
  const objects = await qmp.execute('qom-list', { path: '/objects' });
  const type = /^child<(.+)>$/.exec(objects.find((o) => o.name === ramBlock)?.type ?? '')?.[1];
  const memdev = (await qmp.execute('query-memdev')).find((m) => m.id === ramBlock);
  if (!type || !memdev) throw new VmError('E_VM_SPEC', `QEMU has no memory backend "${ramBlock}"`);
  let memory: MemoryBackend;
  if (type === 'memory-backend-memfd') memory = { kind: 'memfd' };
  else if (type === 'memory-backend-file') {
    const memPath = await qmp.execute('qom-get', { path: `/objects/${ramBlock}`, property: 'mem-path' });
    memory = { kind: 'file', path: String(memPath), share: memdev.share };
  } else memory = { kind: 'ram' };
  return { ramBlock, memory, memMiB: memdev.size / 2 ** 20 };
}

export interface ModeSupport {
  live: { ok: boolean; why: string };
  cow: { ok: boolean; why: string };
  stop: { ok: boolean; why: string };
}

/**
 * Which checkpoint modes work for this VM, and why not: live on TCG needs guest RAM tlc can read
 * (the TCG fix-up); cow needs userfaultfd for the user QEMU runs as.
 */
export function modeSupport(
  accel: Accel,
  memory: MemoryBackend,
  qemu: ProcessIdentity | undefined,
): ModeSupport {
  const readable = memory.kind === 'memfd' || memory.kind === 'file';
  const live =
    accel === 'kvm'
      ? { ok: true, why: 'KVM tracks dirty pages itself' }
      : readable
        ? {
            ok: true,
            why: `TCG, and tlc can read guest RAM (${memory.kind} backend) to repair QEMU's lost writes`,
          }
        : {
            ok: false,
            why: 'TCG with anonymous RAM: tlc cannot read guest RAM to repair the writes QEMU 7.2 loses on TCG',
          };
  if (memory.kind === 'file' && !onShmem(memory.path)) {
    return {
      live,
      cow: {
        ok: false,
        why: `guest RAM is a file on a disk filesystem (${memory.path}): background snapshots write-protect only anonymous, shmem or hugetlbfs memory`,
      },
      stop: { ok: true, why: 'always' },
    };
  }
  const uid = qemu ? processUid(qemu.pid) : undefined;
  const unprivileged = readSysctl('/proc/sys/vm/unprivileged_userfaultfd');
  const cow =
    uid === 0
      ? { ok: true, why: 'QEMU runs as root: userfaultfd is available' }
      : unprivileged === '1'
        ? { ok: true, why: 'vm.unprivileged_userfaultfd=1' }
        : {
            ok: false,
            why: `QEMU runs as uid ${uid ?? '?'} and vm.unprivileged_userfaultfd=${unprivileged ?? '?'}: background snapshots need userfaultfd (sysctl vm.unprivileged_userfaultfd=1)`,
          };
  return { live, cow, stop: { ok: true, why: 'always' } };
}

const TMPFS_MAGIC = 0x01021994;
const HUGETLBFS_MAGIC = 0x958458f6;

/** Whether a file lives on tmpfs or hugetlbfs, the file memory userfaultfd can write-protect. */
function onShmem(file: string): boolean {
  try {
    const type = fs.statfsSync(file).type;
    return type === TMPFS_MAGIC || type === HUGETLBFS_MAGIC;
  } catch {
    return false;
  }
}

function processUid(pid: number): number | undefined {
  try {
    const m = /^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m?.[1] ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

function readSysctl(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8').trim();
  } catch {
    return undefined;
  }
}
