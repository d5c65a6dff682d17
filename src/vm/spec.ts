import { TlcError } from '../core/errors.js';

/** The id of guest RAM's memory backend: the RAM block is called `ram0` on every host. */
export const RAM_BACKEND_ID = 'ram0';

export type Accel = 'tcg' | 'kvm';

/** Where guest RAM lives. A restore swaps this for the checkpoint's RAM image (`share: false`). */
export type MemoryBackend =
  { kind: 'ram' } | { kind: 'memfd' } | { kind: 'file'; path: string; share: boolean };

/**
 * Everything needed to start the identical machine again. Saved as JSON beside the VM and copied
 * into every checkpoint's manifest.
 */
export interface VmSpec {
  specVersion: 1;
  name: string;
  qemu: { binary: string; version: string };
  /** Resolved machine type (`pc-i440fx-7.2`, never the alias `pc`): the stream is tied to it. */
  machine: string;
  accel: Accel;
  memMiB: number;
  cpus: number;
  memory: MemoryBackend;
  kernel?: string;
  initrd?: string;
  append?: string;
  /** Workload spec the bundled guest runs, when it is the bundled guest. */
  workload?: string;
  /** Arguments appended verbatim (devices, disks, ...). */
  extraArgs: string[];
  /** For a QEMU tlc adopted: its original command line, from /proc/<pid>/cmdline. */
  adoptedArgv?: string[];
}

export interface RuntimePaths {
  qmpSocket: string;
  consoleLog: string;
  pidFile: string;
}

/** Options that describe one launch of a spec: where its sockets and logs go, and how it starts. */
export interface LaunchArgs extends RuntimePaths {
  /** `-incoming` URI for a restore. */
  incoming?: string;
  /** Start paused (`-S`). */
  paused?: boolean;
}

function memoryBackendArg(spec: VmSpec): string {
  const size = `size=${spec.memMiB}M`;
  if (spec.memory.kind === 'ram') return `memory-backend-ram,id=${RAM_BACKEND_ID},${size}`;
  if (spec.memory.kind === 'memfd') return `memory-backend-memfd,id=${RAM_BACKEND_ID},${size},share=on`;
  const share = spec.memory.share ? 'on' : 'off';
  return `memory-backend-file,id=${RAM_BACKEND_ID},${size},mem-path=${spec.memory.path},share=${share}`;
}

/** The QEMU argv (without the binary) for a tlc-managed VM. */
export function qemuArgv(spec: VmSpec, launch: LaunchArgs): string[] {
  if (spec.adoptedArgv) return adoptedArgv(spec, launch);
  const argv = [
    '-name',
    spec.name,
    '-machine',
    `${spec.machine},accel=${spec.accel},memory-backend=${RAM_BACKEND_ID}`,
    '-object',
    memoryBackendArg(spec),
    '-m',
    `${spec.memMiB}M`,
    '-smp',
    String(spec.cpus),
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-chardev',
    `file,id=ser0,path=${launch.consoleLog}`,
    '-serial',
    'chardev:ser0',
    '-qmp',
    `unix:${launch.qmpSocket},server=on,wait=off`,
    '-pidfile',
    launch.pidFile,
  ];
  if (spec.kernel) argv.push('-kernel', spec.kernel);
  if (spec.initrd) argv.push('-initrd', spec.initrd);
  if (spec.append) argv.push('-append', spec.append);
  if (launch.paused) argv.push('-S');
  if (launch.incoming) argv.push('-incoming', launch.incoming);
  argv.push(...spec.extraArgs);
  return argv;
}

/** Options of an adopted command line that tlc replaces with its own on a restart. */
const ADOPTED_DROP_WITH_VALUE = new Set(['-qmp', '-monitor', '-incoming', '-pidfile', '-chardev-qmp']);
const ADOPTED_DROP_FLAG = new Set(['-daemonize', '-S']);

function adoptedArgv(spec: VmSpec, launch: LaunchArgs): string[] {
  const original = spec.adoptedArgv ?? [];
  const out: string[] = [];
  for (let i = 1; i < original.length; i++) {
    const arg = original[i] as string;
    const bare = arg.startsWith('--') ? arg.slice(1) : arg;
    if (ADOPTED_DROP_WITH_VALUE.has(bare)) {
      i++;
      continue;
    }
    if (ADOPTED_DROP_FLAG.has(bare)) continue;
    out.push(arg);
  }
  out.push('-qmp', `unix:${launch.qmpSocket},server=on,wait=off`, '-pidfile', launch.pidFile);
  if (launch.paused) out.push('-S');
  if (launch.incoming) out.push('-incoming', launch.incoming);
  return out;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

export function validateVmName(name: string): string {
  if (!NAME_RE.test(name)) {
    throw new TlcError('E_USAGE', `Invalid VM name "${name}": use 1-64 letters, digits, '.', '_' or '-'`);
  }
  return name;
}

export function parseVmSpec(json: unknown, where: string): VmSpec {
  const spec = json as Partial<VmSpec> | null;
  if (!spec || typeof spec !== 'object' || spec.specVersion !== 1) {
    throw new TlcError('E_VM_SPEC', `${where}: not a tlc VM spec of version 1`);
  }
  for (const key of ['name', 'machine', 'accel'] as const) {
    if (typeof spec[key] !== 'string') throw new TlcError('E_VM_SPEC', `${where}: field "${key}" missing`);
  }
  if (typeof spec.memMiB !== 'number' || typeof spec.cpus !== 'number' || !spec.qemu || !spec.memory) {
    throw new TlcError('E_VM_SPEC', `${where}: fields memMiB/cpus/qemu/memory missing`);
  }
  return { extraArgs: [], ...spec } as VmSpec;
}
