/**
 * A libvirt domain for tlc's bundled test guest (kernel + initramfs, guest/init.sh), the libvirt
 * counterpart of the QEMU command line src/vm/spec.ts builds: TCG or KVM, no disks, no network, the
 * serial console appended to a file, nothing else (no USB, no balloon).
 *
 * Paths, as libvirt 9.0 on Debian 12 with its stock qemu.conf needs them:
 * - kernel and initrd are opened by QEMU itself, running as `libvirt-qemu`. libvirt chowns the
 *   files (dynamic ownership) but not the directories above them, so they must sit where that user
 *   can reach them: `stageGuestFiles` copies them out of ~/.cache (under a 0700 /root) into a
 *   0755 directory, by default under /var/lib/libvirt/images.
 * - the serial console file is opened by libvirt (as root) and handed to QEMU as a descriptor
 *   (`-add-fd ... -chardev file,path=/dev/fdset/N`), so any path root can write works. `append`
 *   keeps the earlier output when libvirt reopens it, e.g. on `virsh restore`.
 */
import { chmod, copyFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { GuestImage } from '../guest/build.js';

export const LIBVIRT_IMAGES_DIR = '/var/lib/libvirt/images';

export interface GuestDomainOptions {
  /** Domain name: 1-64 letters, digits, '.', '_' or '-'. */
  name: string;
  memMiB: number;
  vcpus?: number;
  /** `qemu` (TCG) or `kvm`; default `qemu`. */
  type?: 'qemu' | 'kvm';
  /** Machine type; default `pc` (libvirt stores the versioned name, e.g. pc-i440fx-7.2). */
  machine?: string;
  kernel: string;
  initrd: string;
  /** Kernel command line: guestAppendLine(workload). */
  cmdline: string;
  /** File the guest's serial console is appended to. */
  consoleLog: string;
  /**
   * RAM as a shared memfd (`<memoryBacking><source type='memfd'/><access mode='shared'/>`): QEMU's
   * RAM block is then backed by a memfd that another process can map through /proc/PID/fd.
   */
  memfd?: boolean;
  uuid?: string;
  emulator?: string;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Escapes text for an XML attribute or element. */
export function xmlEscape(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** The domain XML for `virsh define`. */
export function guestDomainXml(opts: GuestDomainOptions): string {
  if (!NAME_RE.test(opts.name)) {
    throw new RangeError(`Invalid domain name "${opts.name}": use 1-64 letters, digits, '.', '_' or '-'`);
  }
  if (!Number.isInteger(opts.memMiB) || opts.memMiB < 16)
    throw new RangeError(`Bad memory size ${opts.memMiB} MiB`);
  const vcpus = opts.vcpus ?? 1;
  if (!Number.isInteger(vcpus) || vcpus < 1) throw new RangeError(`Bad vCPU count ${vcpus}`);
  if (opts.uuid !== undefined && !UUID_RE.test(opts.uuid)) throw new RangeError(`Bad UUID ${opts.uuid}`);
  for (const [what, value] of [
    ['kernel', opts.kernel],
    ['initrd', opts.initrd],
    ['console log', opts.consoleLog],
  ] as const) {
    if (!value.startsWith('/')) throw new RangeError(`The ${what} path must be absolute: ${value}`);
  }
  const e = xmlEscape;
  const lines = [
    `<domain type='${opts.type ?? 'qemu'}'>`,
    `  <name>${e(opts.name)}</name>`,
    ...(opts.uuid ? [`  <uuid>${e(opts.uuid)}</uuid>`] : []),
    `  <memory unit='MiB'>${opts.memMiB}</memory>`,
    ...(opts.memfd
      ? [
          '  <memoryBacking>',
          "    <source type='memfd'/>",
          "    <access mode='shared'/>",
          '  </memoryBacking>',
        ]
      : []),
    `  <vcpu>${vcpus}</vcpu>`,
    '  <os>',
    `    <type arch='x86_64' machine='${e(opts.machine ?? 'pc')}'>hvm</type>`,
    `    <kernel>${e(opts.kernel)}</kernel>`,
    `    <initrd>${e(opts.initrd)}</initrd>`,
    `    <cmdline>${e(opts.cmdline)}</cmdline>`,
    '  </os>',
    // ACPI as in tlc's own QEMU command line (libvirt adds -no-acpi without it); the bundled guest
    // has no ACPI daemon, so `virsh shutdown` is accepted and ignored: `virsh destroy` stops it.
    '  <features>',
    '    <acpi/>',
    '  </features>',
    // A reboot (the guest's panic=-1 turns a panic into one) or a power-off ends the domain, so a
    // test sees it stop instead of a fresh boot.
    '  <on_poweroff>destroy</on_poweroff>',
    '  <on_reboot>destroy</on_reboot>',
    '  <on_crash>destroy</on_crash>',
    '  <devices>',
    ...(opts.emulator ? [`    <emulator>${e(opts.emulator)}</emulator>`] : []),
    "    <controller type='usb' model='none'/>",
    "    <serial type='file'>",
    `      <source path='${e(opts.consoleLog)}' append='on'/>`,
    "      <target port='0'/>",
    '    </serial>',
    "    <memballoon model='none'/>",
    '  </devices>',
    '</domain>',
  ];
  return lines.join('\n') + '\n';
}

/**
 * Copies the guest's kernel and initrd into `dir` (created 0755, files 0644) where QEMU running as
 * `libvirt-qemu` can read them; returns the copies.
 */
export async function stageGuestFiles(guest: GuestImage, dir: string): Promise<GuestImage> {
  await mkdir(dir, { recursive: true, mode: 0o755 });
  await chmod(dir, 0o755);
  const kernel = join(dir, 'vmlinuz');
  const initrd = join(dir, 'initrd.gz');
  await copyFile(guest.kernel, kernel);
  await copyFile(guest.initrd, initrd);
  await chmod(kernel, 0o644);
  await chmod(initrd, 0o644);
  return { ...guest, kernel, initrd };
}

/** The file a domain's serial console writes to (`<serial type='file'>`), if it has one. */
export function consoleFromDomainXml(xml: string): string | undefined {
  return /<serial type=["']file["']>\s*<source path=["']([^"']+)["']/.exec(xml)?.[1];
}

/** Where libvirt keeps a running domain's QEMU pid, for the system or a session connection. */
export function domainPidFile(domain: string, uri: string): string {
  const dir = uri.endsWith('/session')
    ? join(process.env.XDG_RUNTIME_DIR ?? '/run/user', 'libvirt', 'qemu', 'run')
    : '/run/libvirt/qemu';
  return join(dir, `${domain}.pid`);
}
