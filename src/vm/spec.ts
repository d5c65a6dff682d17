import { TlcError, UsageError, VmError } from '../core/errors.js';
import { rewriteAdoptedArgv } from './adopted-argv.js';

/** The id of guest RAM's memory backend: the RAM block is called `ram0` on every host. */
export const RAM_BACKEND_ID = 'ram0';

export type Accel = 'tcg' | 'kvm';

/** Where guest RAM lives. A restore swaps this for the checkpoint's RAM image (`share: false`). */
export type MemoryBackend =
  { kind: 'ram' } | { kind: 'memfd' } | { kind: 'file'; path: string; share: boolean };

export type DiskFormat = 'qcow2' | 'raw';
export const DISK_FORMATS: readonly DiskFormat[] = ['qcow2', 'raw'];

/**
 * A virtio-blk disk of a tlc-started VM: a file node `<node>-file`, a format node `<node>` and
 * the device `<device>`, so QMP commands can name both without parsing the command line.
 */
export interface VmDisk {
  /** Absolute path of the image file. */
  path: string;
  format: DiskFormat;
  /** Format node name (`tlc-disk0`); the file node under it is `<node>-file`. */
  node: string;
  /** virtio-blk-pci device id (`tlc-vd0`). */
  device: string;
  readOnly?: boolean;
}

/** The names tlc gives the n-th disk's nodes and device. */
export function diskNames(index: number): { node: string; device: string } {
  return { node: `tlc-disk${index}`, device: `tlc-vd${index}` };
}

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
  /**
   * Memory backend id of main RAM, which is also its RAM block's name in the migration stream.
   * Absent for tlc's own VMs (`ram0`); an adopted QEMU's may be anything (`pc.ram` for plain `-m`).
   */
  ramBlock?: string;
  kernel?: string;
  initrd?: string;
  append?: string;
  /**
   * Workload spec the bundled guest runs. Absent for a custom guest (the user's kernel or a
   * disk boot) and for an adopted QEMU.
   */
  workload?: string;
  /** virtio-blk disks, in device order (absent in specs written before tlc managed disks). */
  disks?: VmDisk[];
  /** Arguments appended verbatim (`--qemu-arg`: devices, network, ...). */
  extraArgs: string[];
  /**
   * A libvirt domain: its name, connection URI and `virsh dumpxml --migratable` XML. A restore
   * brings it back with `virsh restore` from a save image built from the checkpoint.
   */
  libvirt?: { domain: string; uri: string; xml: string };
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
  /** Adopted command line: keep its writable disks as they are (see rewriteAdoptedArgv). */
  keepAdoptedDisks?: boolean;
  /** Adopted command line: original image path → the restored VM's overlay (`-drive file=`). */
  diskOverlays?: Record<string, string>;
}

/**
 * A value for a QEMU option string (`key=value,key=value`): QEMU reads `,,` as a literal comma,
 * so commas are doubled. A newline or NUL cannot be passed (QEMU's option and JSON parsers and
 * the kernel's argv would cut or misread it), so such a value is refused.
 */
export function qemuOptionValue(value: string, what = 'path'): string {
  if (/[\n\0]/.test(value)) {
    throw new VmError(
      'E_VM_SPEC',
      `Cannot pass ${what} ${JSON.stringify(value)} to QEMU: it contains a newline or NUL`,
    );
  }
  return value.replaceAll(',', ',,');
}

/** The RAM block (memory backend id) that holds main guest RAM: `ram0` for tlc's VMs. */
export function ramBlockOf(spec: VmSpec): string {
  return spec.ramBlock ?? RAM_BACKEND_ID;
}

function memoryBackendArg(spec: VmSpec): string {
  const size = `size=${spec.memMiB}M`;
  const id = `id=${ramBlockOf(spec)}`;
  if (spec.memory.kind === 'ram') return `memory-backend-ram,${id},${size}`;
  if (spec.memory.kind === 'memfd') return `memory-backend-memfd,${id},${size},share=on`;
  const share = spec.memory.share ? 'on' : 'off';
  const memPath = qemuOptionValue(spec.memory.path, 'memory file');
  return `memory-backend-file,${id},${size},mem-path=${memPath},share=${share}`;
}

/** `-blockdev` file node, `-blockdev` format node and `-device` for one disk. */
function diskArgs(disk: VmDisk): string[] {
  const ro = disk.readOnly ? ',read-only=on' : '';
  const filename = qemuOptionValue(disk.path, 'disk image');
  return [
    '-blockdev',
    `driver=file,node-name=${disk.node}-file,filename=${filename}${ro}`,
    '-blockdev',
    `driver=${disk.format},node-name=${disk.node},file=${disk.node}-file${ro}`,
    '-device',
    `virtio-blk-pci,drive=${disk.node},id=${disk.device}`,
  ];
}

function qmpArg(launch: LaunchArgs): string {
  return `unix:${qemuOptionValue(launch.qmpSocket, 'QMP socket')},server=on,wait=off`;
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
    `file,id=ser0,path=${qemuOptionValue(launch.consoleLog, 'console log')}`,
    '-serial',
    'chardev:ser0',
    '-qmp',
    qmpArg(launch),
    '-pidfile',
    launch.pidFile,
  ];
  if (spec.kernel) argv.push('-kernel', spec.kernel);
  if (spec.initrd) argv.push('-initrd', spec.initrd);
  if (spec.append) argv.push('-append', spec.append);
  if (launch.paused) argv.push('-S');
  if (launch.incoming) argv.push('-incoming', launch.incoming);
  for (const disk of spec.disks ?? []) argv.push(...diskArgs(disk));
  argv.push(...spec.extraArgs);
  return argv;
}

function adoptedArgv(spec: VmSpec, launch: LaunchArgs): string[] {
  const out = rewriteAdoptedArgv(spec.adoptedArgv ?? [], {
    ramBlock: ramBlockOf(spec),
    memoryObject: memoryBackendArg(spec),
    consoleLog: launch.consoleLog,
    ...(launch.keepAdoptedDisks ? { keepDisks: true } : {}),
    ...(launch.diskOverlays ? { diskOverlays: launch.diskOverlays } : {}),
  });
  out.push('-qmp', qmpArg(launch), '-pidfile', launch.pidFile);
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
  if (spec.disks !== undefined) {
    if (!Array.isArray(spec.disks)) throw new TlcError('E_VM_SPEC', `${where}: field "disks" is not a list`);
    spec.disks.forEach((d, i) => checkDisk(d, `${where}: disks[${i}]`));
  }
  return { extraArgs: [], ...spec } as VmSpec;
}

function checkDisk(value: unknown, where: string): void {
  const d = value as Partial<VmDisk> | null;
  const ok =
    d !== null &&
    typeof d === 'object' &&
    typeof d.path === 'string' &&
    typeof d.node === 'string' &&
    typeof d.device === 'string' &&
    DISK_FORMATS.includes(d.format as DiskFormat) &&
    (d.readOnly === undefined || typeof d.readOnly === 'boolean');
  if (!ok) throw new TlcError('E_VM_SPEC', `${where}: not a disk (path, format qcow2|raw, node, device)`);
}

/** A disk as the user names it, before tlc has looked at the file. */
export interface DiskRequest {
  path: string;
  format?: DiskFormat;
  readOnly?: boolean;
}

/**
 * Parses `--disk PATH[,format=qcow2|raw][,readonly=on|off]`. As in QEMU's own option strings,
 * `,,` stands for a comma that is part of the path.
 */
export function parseDiskArg(text: string): DiskRequest {
  const fields: string[] = [''];
  for (let i = 0; i < text.length; i++) {
    const c = text[i] as string;
    if (c !== ',') fields[fields.length - 1] += c;
    else if (text[i + 1] === ',') {
      fields[fields.length - 1] += ',';
      i++;
    } else fields.push('');
  }
  const [path, ...options] = fields;
  if (!path)
    throw new UsageError(`--disk "${text}": no image path (expected PATH[,format=qcow2|raw][,readonly=on])`);
  const disk: DiskRequest = { path };
  for (const option of options) {
    const eq = option.indexOf('=');
    const key = eq < 0 ? option : option.slice(0, eq);
    const value = eq < 0 ? '' : option.slice(eq + 1);
    if (key === 'format' && DISK_FORMATS.includes(value as DiskFormat)) disk.format = value as DiskFormat;
    else if (key === 'readonly' && (value === 'on' || value === 'off')) disk.readOnly = value === 'on';
    else {
      throw new UsageError(
        `--disk "${text}": unknown option "${option}" (expected format=qcow2|raw or readonly=on|off; ` +
          'write a comma in the path as ",,")',
      );
    }
  }
  return disk;
}
