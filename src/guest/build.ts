/**
 * Builds the bundled test guest: Debian's cloud kernel plus an initramfs holding busybox,
 * guest/init.sh as /init and the static workloads compiled from guest/*.c.
 *
 * Everything comes from Debian packages via apt (no other network). Results are cached:
 *   <cacheDir>/images/<key>/{vmlinuz,initrd.gz,manifest.json}
 *       key = hash of the guest sources and the exact kernel + busybox package versions
 *   <cacheDir>/by-source/<sourceHash>.json
 *       which image was last built from these sources, so that an unchanged second call
 *       returns without running apt or gcc. `force` re-resolves packages and rebuilds.
 * Every write is to a temporary name followed by a rename, so concurrent builders and
 * interrupted builds never leave a half-written image behind.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';

import { errorText, GuestBuildError, isErrnoCode, UsageError } from '../core/errors.js';
import { newcArchive, type CpioEntry } from './cpio.js';

export interface GuestImage {
  kernel: string;
  initrd: string;
  kernelVersion: string;
}

export interface BuildGuestOptions {
  cacheDir: string;
  log?: (line: string) => void;
  force?: boolean;
  /** Directory with init.sh and the workload sources; defaults to the repository's guest/. */
  sourceDir?: string;
}

export type DirtyPattern = 'random' | 'stream' | 'hotcold' | 'bytes';

/** One guest program. */
export type SingleWorkloadSpec =
  | { kind: 'memverify'; mib: number; rate: number; grow?: boolean }
  | { kind: 'dirty'; mib: number; pattern: DirtyPattern }
  | { kind: 'idle' }
  /** Appends `records` fsynced records to /mnt/records on /dev/vda (0: forever). */
  | { kind: 'diskverify'; records: number };

/**
 * What the guest runs: one program, or diskverify beside one memory workload
 * (`diskverify:0+memverify:32`), both at once.
 */
export type WorkloadSpec =
  | SingleWorkloadSpec
  | { kind: 'combined'; disk: { kind: 'diskverify'; records: number }; memory: MemoryWorkloadSpec };

export type MemoryWorkloadSpec = Extract<SingleWorkloadSpec, { kind: 'memverify' | 'dirty' }>;

/** Bump when the recipe below changes in a way that must invalidate cached images. */
const RECIPE_VERSION = 'tlc-guest-recipe-2';
const KERNEL_METAPACKAGE = 'linux-image-cloud-amd64';
const BUSYBOX_PACKAGE = 'busybox-static';
/** Workload programs; each is built from guest/<name>.c into /bin/<name>. */
const WORKLOADS = ['memverify', 'dirty', 'idle', 'diskverify'] as const;
/** Busybox applets linked into /bin: the ones init.sh uses plus a few for poking around. */
const APPLETS = [
  'sh',
  'mount',
  'cat',
  'sleep',
  'echo',
  'ls',
  'ps',
  'dmesg',
  'free',
  'uname',
  'poweroff',
  'insmod',
  'umount',
  'sync',
];
/**
 * Kernel modules the guest needs for a virtio-blk disk with ext4 on it. Those the kernel builds
 * in are skipped; the others go into the initramfs with their dependencies (from each module's
 * .modinfo), and init.sh loads them in order when the VM has a virtio device. In Debian 12's
 * cloud kernel virtio, virtio_ring, virtio_pci(_modern_dev, _legacy_dev) and virtio_blk are
 * modules, ext4 (with jbd2, mbcache, crc16, crc32c) is built in.
 */
const GUEST_MODULES = ['virtio_pci', 'virtio_blk', 'ext4'] as const;
/** Kernel features the guest relies on before init.sh can load modules: all must be built in. */
const REQUIRED_KERNEL_CONFIG = [
  'CONFIG_BLK_DEV_INITRD',
  'CONFIG_RD_GZIP',
  'CONFIG_DEVTMPFS',
  'CONFIG_PROC_FS',
  'CONFIG_SYSFS',
  'CONFIG_BINFMT_ELF',
  'CONFIG_BINFMT_SCRIPT',
  'CONFIG_SERIAL_8250',
  'CONFIG_SERIAL_8250_CONSOLE',
];
const MAX_MIB = 1024 * 1024;
const MAX_RATE = 1_000_000_000;
const MAX_RECORDS = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// Workload specs and the kernel command line

const SPEC_USAGE =
  'expected memverify:<MiB>[:<rate>[:grow]], dirty:<MiB>:<random|stream|hotcold|bytes>, idle, diskverify:<records>, ' +
  'or diskverify:<records>+<memverify or dirty spec>';

function parseCount(spec: string, what: string, text: string | undefined, min: number, max: number): number {
  if (text === undefined || !/^\d+$/.test(text)) {
    throw new UsageError(`Bad workload "${spec}": ${what} must be a whole number; ${SPEC_USAGE}`);
  }
  const n = Number(text);
  if (n < min || n > max) {
    throw new UsageError(`Bad workload "${spec}": ${what} must be between ${min} and ${max}, got ${text}`);
  }
  return n;
}

function parseSingle(spec: string, part: string): SingleWorkloadSpec {
  const parts = part.split(':');
  switch (parts[0]) {
    case 'memverify': {
      if (parts.length < 2 || parts.length > 4 || (parts.length === 4 && parts[3] !== 'grow')) break;
      const mib = parseCount(spec, 'MiB', parts[1], 1, MAX_MIB);
      const rate = parts.length >= 3 ? parseCount(spec, 'rate', parts[2], 0, MAX_RATE) : 0;
      return parts.length === 4
        ? { kind: 'memverify', mib, rate, grow: true }
        : { kind: 'memverify', mib, rate };
    }
    case 'dirty': {
      if (parts.length !== 3) break;
      const mib = parseCount(spec, 'MiB', parts[1], 1, MAX_MIB);
      const pattern = parts[2];
      if (pattern !== 'random' && pattern !== 'stream' && pattern !== 'hotcold' && pattern !== 'bytes') {
        throw new UsageError(`Bad workload "${spec}": unknown dirty pattern "${pattern}"; ${SPEC_USAGE}`);
      }
      return { kind: 'dirty', mib, pattern };
    }
    case 'diskverify':
      if (parts.length !== 2) break;
      return { kind: 'diskverify', records: parseCount(spec, 'records', parts[1], 0, MAX_RECORDS) };
    case 'idle':
      if (parts.length === 1) return { kind: 'idle' };
      break;
  }
  throw new UsageError(`Bad workload "${spec}": ${SPEC_USAGE}`);
}

/**
 * Parses a guest workload spec such as `memverify:64`, `memverify:64:1000`, `dirty:64:random`,
 * `idle`, `diskverify:0` or `diskverify:0+memverify:32` (in either order).
 */
export function parseWorkloadSpec(spec: string): WorkloadSpec {
  const parts = spec.split('+');
  if (parts.length === 1) return parseSingle(spec, spec);
  const singles = parts.map((p) => parseSingle(spec, p));
  const disk = singles.filter((w) => w.kind === 'diskverify');
  const memory = singles.filter((w): w is MemoryWorkloadSpec => w.kind === 'memverify' || w.kind === 'dirty');
  if (singles.length !== 2 || disk.length !== 1 || memory.length !== 1 || !disk[0] || !memory[0]) {
    throw new UsageError(
      `Bad workload "${spec}": '+' joins diskverify:<records> with one memverify or dirty workload`,
    );
  }
  return { kind: 'combined', disk: disk[0], memory: memory[0] };
}

/** The canonical text of a spec (what /init prints in its boot line). */
export function formatWorkloadSpec(spec: WorkloadSpec): string {
  switch (spec.kind) {
    case 'memverify':
      if (spec.grow) return `memverify:${spec.mib}:${spec.rate}:grow`;
      return spec.rate ? `memverify:${spec.mib}:${spec.rate}` : `memverify:${spec.mib}`;
    case 'dirty':
      return `dirty:${spec.mib}:${spec.pattern}`;
    case 'idle':
      return 'idle';
    case 'diskverify':
      return `diskverify:${spec.records}`;
    case 'combined':
      return `${formatWorkloadSpec(spec.disk)}+${formatWorkloadSpec(spec.memory)}`;
  }
}

/** Whether the workload reads and writes the VM's first disk (/dev/vda). */
export function workloadUsesDisk(spec: WorkloadSpec): boolean {
  return spec.kind === 'diskverify' || spec.kind === 'combined';
}

/**
 * Kernel parameters for a fast, quiet boot under TCG (each one measured to help or to keep
 * the console clean for heartbeat parsing):
 *   console=ttyS0        all output on the first serial port, which the host captures
 *   quiet loglevel=1     only emergencies on the console: kernel messages must not
 *                        interleave with heartbeat lines, and serial output is slow under TCG
 *   panic=-1             reboot at once on panic (the boot line then appears a second time)
 *   mitigations=off      no speculation mitigations: a test guest, and they cost under TCG
 *   cryptomgr.notests    skip crypto self tests at boot
 *   8250.nr_uarts=1      do not probe serial ports that do not exist
 *   i8042.noaux i8042.nokbd  skip slow PS/2 probing (no keyboard or mouse is used)
 *   nowatchdog           no soft/hard-lockup reports when the VM is paused for a checkpoint
 *   tsc=reliable         no clocksource watchdog that may demote the TSC after a pause
 * Deliberately not used: acpi=off boots ~0.2 s faster under TCG but leaves the guest with
 * tick-granular (4 ms) timers and roughly halves workload throughput.
 * Measured on QEMU 7.2 TCG, 256 MiB, memverify:64: first heartbeat ~2.8 s after QEMU starts
 * with only console=ttyS0, ~2.0 s with this line.
 */
export function guestAppendLine(workload: string): string {
  const spec = formatWorkloadSpec(parseWorkloadSpec(workload));
  return [
    'console=ttyS0',
    'quiet',
    'loglevel=1',
    'panic=-1',
    'mitigations=off',
    'cryptomgr.notests',
    '8250.nr_uarts=1',
    'i8042.noaux',
    'i8042.nokbd',
    'nowatchdog',
    'tsc=reliable',
    `tlc.workload=${spec}`,
  ].join(' ');
}

// ---------------------------------------------------------------------------------------------
// Cache locations

/** `$TLC_GUEST_DIR`, else `$XDG_CACHE_HOME/tlc/guest`, else `~/.cache/tlc/guest`. */
export function defaultGuestCacheDir(): string {
  const explicit = process.env['TLC_GUEST_DIR'];
  if (explicit) return resolve(explicit);
  const xdg = process.env['XDG_CACHE_HOME'];
  return join(xdg ? resolve(xdg) : join(homedir(), '.cache'), 'tlc', 'guest');
}

/** Finds the repository's guest/ directory from this module's location (src/ or dist/src/). */
function defaultSourceDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = join(dir, 'guest');
    if (existsSync(join(candidate, 'init.sh')) && existsSync(join(dir, 'package.json'))) return candidate;
    const parent = dirname(dir);
    if (parent === dir)
      throw new GuestBuildError('Cannot build guest: guest/init.sh not found above this module');
    dir = parent;
  }
}

interface Sources {
  dir: string;
  /** File name → contents, for init.sh and every *.c / *.h. */
  files: Map<string, Buffer>;
  hash: string;
}

async function readSources(dir: string): Promise<Sources> {
  let names: string[];
  try {
    names = (await readdir(dir)).filter((n) => n === 'init.sh' || /\.[ch]$/.test(n)).sort();
  } catch (err) {
    throw new GuestBuildError(`Cannot build guest: cannot read ${dir}: ${errorText(err)}`, { cause: err });
  }
  for (const w of WORKLOADS) {
    if (!names.includes(`${w}.c`))
      throw new GuestBuildError(`Cannot build guest: ${join(dir, `${w}.c`)} is missing`);
  }
  if (!names.includes('init.sh'))
    throw new GuestBuildError(`Cannot build guest: ${join(dir, 'init.sh')} is missing`);
  const files = new Map<string, Buffer>();
  const h = createHash('sha256').update(
    `${RECIPE_VERSION}\n${APPLETS.join(',')}\n${GUEST_MODULES.join(',')}\n`,
  );
  for (const name of names) {
    const data = await readFile(join(dir, name));
    files.set(name, data);
    h.update(`${name}\0${data.length}\0`).update(data);
  }
  return { dir, files, hash: h.digest('hex').slice(0, 24) };
}

interface Manifest {
  kernelVersion: string;
  /** Kernel modules in the initramfs, in load order. */
  modules: string[];
  kernelPackage: string;
  busyboxPackage: string;
  sourceHash: string;
  builtAt: string;
}

interface Pointer {
  image: string;
}

async function readJson<T>(path: string): Promise<T | null> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as T;
  } catch {
    return null;
  }
}

/** A complete image directory (all three files present) or null. */
async function loadImage(dir: string): Promise<GuestImage | null> {
  const manifest = await readJson<Manifest>(join(dir, 'manifest.json'));
  if (!manifest || typeof manifest.kernelVersion !== 'string') return null;
  const kernel = join(dir, 'vmlinuz');
  const initrd = join(dir, 'initrd.gz');
  try {
    if (!(await stat(kernel)).isFile() || !(await stat(initrd)).isFile()) return null;
  } catch {
    return null;
  }
  return { kernel, initrd, kernelVersion: manifest.kernelVersion };
}

async function writeFileAtomic(path: string, data: string | Buffer): Promise<void> {
  const tmp = `${path}.tmp-${randomBytes(6).toString('hex')}`;
  await writeFile(tmp, data);
  await rename(tmp, path);
}

// ---------------------------------------------------------------------------------------------
// Running host tools

const run = promisify(execFile);

interface RunResult {
  stdout: string;
  stderr: string;
}

function tail(text: string, lines = 12): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

async function runTool(
  cmd: string,
  args: string[],
  opts: { cwd?: string; timeoutMs?: number } = {},
): Promise<RunResult> {
  try {
    const { stdout, stderr } = await run(cmd, args, {
      cwd: opts.cwd,
      timeout: opts.timeoutMs ?? 600_000,
      maxBuffer: 64 * 1024 * 1024,
      env: { ...process.env, LC_ALL: 'C', LANG: 'C' },
      encoding: 'utf8',
    });
    return { stdout, stderr };
  } catch (err) {
    if (isErrnoCode(err, 'ENOENT')) {
      throw new GuestBuildError(
        `Cannot build guest: ${cmd} not found; install it with apt-get install ${PROVIDER[cmd] ?? cmd}`,
        {
          cause: err,
        },
      );
    }
    const e = err as { stderr?: string; stdout?: string; killed?: boolean; code?: unknown };
    const why = e.killed ? 'timed out' : `failed (exit ${String(e.code)})`;
    const output = tail(e.stderr || e.stdout || errorText(err));
    throw new GuestBuildError(`Cannot build guest: \`${cmd} ${args.join(' ')}\` ${why}:\n${output}`, {
      cause: err,
    });
  }
}

/** Debian package that provides each tool, for the "install it with" hint. */
const PROVIDER: Record<string, string> = {
  'apt-get': 'apt',
  'apt-cache': 'apt',
  dpkg: 'dpkg',
  gcc: 'gcc',
};

async function requireTools(): Promise<void> {
  for (const tool of ['apt-get', 'apt-cache', 'dpkg', 'gcc']) {
    await runTool(tool, ['--version'], { timeoutMs: 30_000 });
  }
}

// ---------------------------------------------------------------------------------------------
// Debian packages

interface Package {
  name: string;
  version: string;
}

/** `apt-cache show` of the candidate version, as field → value (continuation lines dropped). */
async function showPackage(name: string): Promise<Map<string, string> | null> {
  let out: RunResult;
  try {
    out = await runTool('apt-cache', ['show', '--no-all-versions', name], { timeoutMs: 60_000 });
  } catch (err) {
    // "No packages found" / "Unable to locate": the lists are missing or stale.
    if (err instanceof GuestBuildError && !isErrnoCode(err.cause, 'ENOENT')) return null;
    throw err;
  }
  const fields = new Map<string, string>();
  for (const line of out.stdout.split('\n')) {
    if (line === '') break; // only the first (candidate) stanza
    const m = /^([A-Za-z0-9-]+):\s*(.*)$/.exec(line);
    if (m?.[1] && m[2] !== undefined) fields.set(m[1], m[2]);
  }
  return fields.has('Version') ? fields : null;
}

async function resolvePackagesOnce(): Promise<{ kernel: Package; busybox: Package } | null> {
  const meta = await showPackage(KERNEL_METAPACKAGE);
  if (!meta) return null;
  const depends = meta.get('Depends') ?? '';
  const kernelName = /\b(linux-image-[0-9][^\s,|()]*-cloud-amd64)\b/.exec(depends)?.[1];
  if (!kernelName) {
    throw new GuestBuildError(
      `Cannot build guest: ${KERNEL_METAPACKAGE} does not depend on a versioned kernel (Depends: ${depends})`,
    );
  }
  const kernel = await showPackage(kernelName);
  const busybox = await showPackage(BUSYBOX_PACKAGE);
  if (!kernel || !busybox) return null;
  return {
    kernel: { name: kernelName, version: kernel.get('Version') ?? '' },
    busybox: { name: BUSYBOX_PACKAGE, version: busybox.get('Version') ?? '' },
  };
}

/** Resolves the exact packages to use, running `apt-get update` once if the lists lack them. */
async function resolvePackages(log: (line: string) => void): Promise<{ kernel: Package; busybox: Package }> {
  const first = await resolvePackagesOnce();
  if (first) return first;
  log('guest: apt package lists are missing or stale; running apt-get update');
  await runTool('apt-get', ['update']).catch((err: unknown) => {
    const hint = process.getuid?.() === 0 ? '' : ' (run `sudo apt-get update` first)';
    throw new GuestBuildError(`${errorText(err)}${hint}`, { cause: err });
  });
  const second = await resolvePackagesOnce();
  if (second) return second;
  throw new GuestBuildError(
    `Cannot build guest: apt knows no ${KERNEL_METAPACKAGE} / ${BUSYBOX_PACKAGE} even after apt-get update; ` +
      'is a Debian main repository configured for amd64?',
  );
}

/** Downloads one exact package version into `dir` and unpacks it into `dir/<name>/`. */
async function fetchPackage(pkg: Package, dir: string): Promise<string> {
  // apt-get download writes into the cwd; as root it warns that the _apt sandbox user cannot
  // write there and downloads unsandboxed, which is fine.
  await runTool('apt-get', ['download', `${pkg.name}=${pkg.version}`], { cwd: dir });
  const deb = (await readdir(dir)).find((n) => n.startsWith(`${pkg.name}_`) && n.endsWith('.deb'));
  if (!deb)
    throw new GuestBuildError(`Cannot build guest: apt-get download ${pkg.name} produced no .deb in ${dir}`);
  const root = join(dir, pkg.name);
  await runTool('dpkg', ['-x', join(dir, deb), root]);
  return root;
}

async function extractKernel(root: string): Promise<{ vmlinuz: Buffer; version: string }> {
  const bootDir = join(root, 'boot');
  const names = await readdir(bootDir).catch(() => [] as string[]);
  const image = names.find((n) => n.startsWith('vmlinuz-'));
  if (!image) throw new GuestBuildError(`Cannot build guest: no boot/vmlinuz-* in the kernel package`);
  const version = image.slice('vmlinuz-'.length);
  const config = await readFile(join(bootDir, `config-${version}`), 'utf8').catch(() => null);
  if (config !== null) {
    const missing = REQUIRED_KERNEL_CONFIG.filter((opt) => !new RegExp(`^${opt}=y$`, 'm').test(config));
    if (missing.length) {
      throw new GuestBuildError(`Cannot build guest: kernel ${version} lacks built-in ${missing.join(', ')}`);
    }
  }
  return { vmlinuz: await readFile(join(bootDir, image)), version };
}

// ---------------------------------------------------------------------------------------------
// Kernel modules

/**
 * ELF64 little-endian fields needed to find a section (System V ABI, `elf.h`): the file header's
 * section header table offset, entry size, count and the index of the section name table, and
 * in each section header its name offset, file offset and size.
 */
const ELF = {
  MAGIC: Buffer.from([0x7f, 0x45, 0x4c, 0x46]),
  EI_CLASS: 4,
  ELFCLASS64: 2,
  EI_DATA: 5,
  ELFDATA2LSB: 1,
  E_SHOFF: 0x28,
  E_SHENTSIZE: 0x3a,
  E_SHNUM: 0x3c,
  E_SHSTRNDX: 0x3e,
  SH_NAME: 0x00,
  SH_OFFSET: 0x18,
  SH_SIZE: 0x20,
  SHDR_MIN_SIZE: 0x40,
} as const;

/** The `key=value` strings of a kernel module's `.modinfo` section (`depends`, `name`, ...). */
export function parseModinfo(elf: Buffer, where = 'module'): Map<string, string> {
  const fail = (why: string): never => {
    throw new GuestBuildError(`Cannot build guest: ${where} is not a usable kernel module: ${why}`);
  };
  if (elf.length < 0x40 || !elf.subarray(0, 4).equals(ELF.MAGIC)) fail('no ELF header');
  if (elf[ELF.EI_CLASS] !== ELF.ELFCLASS64 || elf[ELF.EI_DATA] !== ELF.ELFDATA2LSB) fail('not ELF64 LE');
  const shoff = Number(elf.readBigUInt64LE(ELF.E_SHOFF));
  const shentsize = elf.readUInt16LE(ELF.E_SHENTSIZE);
  const shnum = elf.readUInt16LE(ELF.E_SHNUM);
  const shstrndx = elf.readUInt16LE(ELF.E_SHSTRNDX);
  if (shentsize < ELF.SHDR_MIN_SIZE || shoff + shnum * shentsize > elf.length || shstrndx >= shnum) {
    fail(`section header table out of bounds (offset ${shoff}, ${shnum} x ${shentsize})`);
  }
  const section = (i: number): { name: number; data: Buffer } => {
    const at = shoff + i * shentsize;
    const offset = Number(elf.readBigUInt64LE(at + ELF.SH_OFFSET));
    const size = Number(elf.readBigUInt64LE(at + ELF.SH_SIZE));
    if (offset + size > elf.length) fail(`section ${i} out of bounds (offset ${offset}, size ${size})`);
    return { name: elf.readUInt32LE(at + ELF.SH_NAME), data: elf.subarray(offset, offset + size) };
  };
  const names = section(shstrndx).data;
  for (let i = 0; i < shnum; i++) {
    const { name, data } = section(i);
    const end = names.indexOf(0, name);
    if (names.toString('latin1', name, end < 0 ? names.length : end) !== '.modinfo') continue;
    const info = new Map<string, string>();
    for (const entry of data.toString('latin1').split('\0')) {
      const eq = entry.indexOf('=');
      if (eq > 0 && !info.has(entry.slice(0, eq))) info.set(entry.slice(0, eq), entry.slice(eq + 1));
    }
    return info;
  }
  return fail('no .modinfo section');
}

/**
 * Load order for `roots` and everything they depend on, dependencies first. `dependsOf` returns a
 * module's dependencies, or null when the kernel has it built in (nothing to load).
 */
export function moduleLoadOrder(
  roots: readonly string[],
  dependsOf: (name: string) => string[] | null,
): string[] {
  const order: string[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = (name: string, path: string[]): void => {
    if (state.get(name) === 'done') return;
    if (state.get(name) === 'visiting') {
      throw new GuestBuildError(
        `Cannot build guest: module dependency cycle ${[...path, name].join(' -> ')}`,
      );
    }
    const deps = dependsOf(name);
    if (deps === null) {
      state.set(name, 'done');
      return;
    }
    state.set(name, 'visiting');
    for (const dep of deps) visit(dep, [...path, name]);
    state.set(name, 'done');
    order.push(name);
  };
  for (const root of roots) visit(root, []);
  return order;
}

/** `kernel/drivers/block/virtio_blk.ko` → `virtio_blk` (module names use '_' for '-'). */
function moduleName(file: string): string {
  return basename(file)
    .replace(/\.ko(\.[a-z]+)?$/, '')
    .replace(/-/g, '_');
}

interface GuestModule {
  name: string;
  data: Buffer;
}

/** The modules of GUEST_MODULES the kernel package does not build in, with their dependencies. */
async function collectModules(kernelRoot: string, version: string): Promise<GuestModule[]> {
  const dir = join(kernelRoot, 'lib', 'modules', version);
  const builtinText = await readFile(join(dir, 'modules.builtin'), 'utf8').catch(() => '');
  const builtin = new Set(builtinText.split('\n').filter(Boolean).map(moduleName));
  const files = new Map<string, string>();
  const listed = await readdir(join(dir, 'kernel'), { recursive: true }).catch(() => [] as string[]);
  for (const rel of listed)
    if (/\.ko(\.[a-z]+)?$/.test(rel)) files.set(moduleName(rel), join(dir, 'kernel', rel));
  const data = new Map<string, Buffer>();
  const depends = new Map<string, string[]>();
  // Read every module reachable from the roots first: moduleLoadOrder is synchronous.
  const pending: string[] = [...GUEST_MODULES];
  while (pending.length > 0) {
    const name = pending.pop() as string;
    if (builtin.has(name) || data.has(name)) continue;
    const file = files.get(name);
    if (!file) {
      throw new GuestBuildError(
        `Cannot build guest: kernel ${version} has neither built in nor a module ${name}`,
      );
    }
    if (!file.endsWith('.ko')) {
      throw new GuestBuildError(
        `Cannot build guest: ${file} is compressed; busybox insmod needs plain .ko files`,
      );
    }
    const elf = await readFile(file);
    const deps = (parseModinfo(elf, file).get('depends') ?? '').split(',').filter(Boolean);
    data.set(name, elf);
    depends.set(name, deps);
    pending.push(...deps);
  }
  const order = moduleLoadOrder(GUEST_MODULES, (name) =>
    builtin.has(name) ? null : (depends.get(name) ?? []),
  );
  return order.map((name) => ({ name, data: data.get(name) as Buffer }));
}

// ---------------------------------------------------------------------------------------------
// Build

async function compileWorkloads(
  sources: Sources,
  outDir: string,
  log: (line: string) => void,
): Promise<Map<string, Buffer>> {
  const bins = new Map<string, Buffer>();
  for (const name of WORKLOADS) {
    const out = join(outDir, name);
    // -s: stripped binaries keep the initramfs (and its unpacking under TCG) small.
    const args = ['-static', '-O2', '-Wall', '-Wextra', '-s', '-o', out, join(sources.dir, `${name}.c`)];
    const { stderr } = await runTool('gcc', args, { timeoutMs: 180_000 });
    if (stderr.trim()) log(`guest: gcc ${name}.c: ${tail(stderr, 4)}`);
    bins.set(name, await readFile(out));
  }
  return bins;
}

function buildInitramfs(
  init: Buffer,
  busybox: Buffer,
  bins: Map<string, Buffer>,
  modules: GuestModule[],
): Buffer {
  const entries: CpioEntry[] = [
    { type: 'dir', path: 'bin' },
    { type: 'dir', path: 'dev' },
    // The kernel opens /dev/console for init before anything is mounted.
    { type: 'chardev', path: 'dev/console', major: 5, minor: 1, mode: 0o600 },
    { type: 'dir', path: 'proc' },
    { type: 'dir', path: 'sys' },
    { type: 'dir', path: 'tmp', mode: 0o1777 },
    { type: 'dir', path: 'mnt' },
    { type: 'file', path: 'init', data: init, mode: 0o755 },
    { type: 'file', path: 'bin/busybox', data: busybox, mode: 0o755 },
    ...APPLETS.map((a): CpioEntry => ({ type: 'symlink', path: `bin/${a}`, target: 'busybox' })),
    ...[...bins].map(([name, data]): CpioEntry => ({ type: 'file', path: `bin/${name}`, data, mode: 0o755 })),
  ];
  if (modules.length > 0) {
    const order = Buffer.from(modules.map((m) => `${m.name}\n`).join(''));
    entries.push(
      { type: 'dir', path: 'lib' },
      { type: 'dir', path: 'lib/modules' },
      ...modules.map((m): CpioEntry => ({ type: 'file', path: `lib/modules/${m.name}.ko`, data: m.data })),
      { type: 'file', path: 'lib/modules/load.order', data: order },
    );
  }
  return gzipSync(newcArchive(entries), { level: 9 });
}

/**
 * Returns the guest kernel and initramfs, building them on first use (or when `force`).
 * Throws GuestBuildError naming the missing tool or the failed command.
 */
export async function buildGuest(opts: BuildGuestOptions): Promise<GuestImage> {
  const log = opts.log ?? (() => {});
  const cacheDir = resolve(opts.cacheDir);
  const sources = await readSources(opts.sourceDir ? resolve(opts.sourceDir) : defaultSourceDir());
  const pointerPath = join(cacheDir, 'by-source', `${sources.hash}.json`);

  if (!opts.force) {
    const pointer = await readJson<Pointer>(pointerPath);
    const cached =
      pointer && typeof pointer.image === 'string'
        ? await loadImage(join(cacheDir, 'images', basename(pointer.image)))
        : null;
    if (cached) {
      log(`guest: using cached image ${dirname(cached.kernel)} (kernel ${cached.kernelVersion})`);
      return cached;
    }
  }

  if (process.platform !== 'linux' || process.arch !== 'x64') {
    throw new GuestBuildError(
      `Cannot build guest: needs an x86-64 Linux host (this is ${process.platform}/${process.arch})`,
    );
  }
  await requireTools();
  log('guest: resolving Debian packages');
  const pkgs = await resolvePackages(log);
  const key = createHash('sha256')
    .update(
      `${sources.hash}\n${pkgs.kernel.name}=${pkgs.kernel.version}\n${pkgs.busybox.name}=${pkgs.busybox.version}\n`,
    )
    .digest('hex')
    .slice(0, 24);
  const imagesDir = join(cacheDir, 'images');
  const imageDir = join(imagesDir, key);
  await mkdir(imagesDir, { recursive: true });
  await mkdir(dirname(pointerPath), { recursive: true });

  const existing = opts.force ? null : await loadImage(imageDir);
  if (existing) {
    await writeFileAtomic(pointerPath, JSON.stringify({ image: key } satisfies Pointer));
    log(`guest: using cached image ${imageDir} (kernel ${existing.kernelVersion})`);
    return existing;
  }

  await removeStaleWorkDirs(cacheDir);
  const work = await mkdtemp(join(cacheDir, '.build-'));
  try {
    log(`guest: downloading ${pkgs.kernel.name} ${pkgs.kernel.version}`);
    const kernelRoot = await fetchPackage(pkgs.kernel, work);
    const kernel = await extractKernel(kernelRoot);
    const modules = await collectModules(kernelRoot, kernel.version);
    log(`guest: downloading ${pkgs.busybox.name} ${pkgs.busybox.version}`);
    const busyboxRoot = await fetchPackage(pkgs.busybox, work);
    const busybox = await readFile(join(busyboxRoot, 'bin', 'busybox')).catch((err: unknown) => {
      throw new GuestBuildError(`Cannot build guest: ${BUSYBOX_PACKAGE} has no bin/busybox`, { cause: err });
    });
    log(`guest: compiling ${WORKLOADS.map((w) => `${w}.c`).join(', ')}`);
    const binDir = join(work, 'workloads');
    await mkdir(binDir);
    const bins = await compileWorkloads(sources, binDir, log);
    const init = sources.files.get('init.sh') ?? Buffer.alloc(0);
    const initrd = buildInitramfs(init, busybox, bins, modules);

    const stage = join(work, 'image');
    await mkdir(stage);
    await writeFile(join(stage, 'vmlinuz'), kernel.vmlinuz);
    await writeFile(join(stage, 'initrd.gz'), initrd);
    const manifest: Manifest = {
      kernelVersion: kernel.version,
      modules: modules.map((m) => m.name),
      kernelPackage: `${pkgs.kernel.name}=${pkgs.kernel.version}`,
      busyboxPackage: `${pkgs.busybox.name}=${pkgs.busybox.version}`,
      sourceHash: sources.hash,
      builtAt: new Date().toISOString(),
    };
    await writeFile(join(stage, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
    await installImage(stage, imageDir, work, opts.force === true);
    await writeFileAtomic(pointerPath, JSON.stringify({ image: key } satisfies Pointer));
    const image = await loadImage(imageDir);
    if (!image) throw new GuestBuildError(`Cannot build guest: ${imageDir} is incomplete after install`);
    const loaded = modules.length ? `, modules ${modules.map((m) => m.name).join(' ')}` : '';
    log(`guest: built ${imageDir} (kernel ${image.kernelVersion}${loaded}, initrd ${initrd.length} bytes)`);
    return image;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/**
 * Renames the staged directory into place. If an image with this key already exists (a
 * concurrent builder won the race), it is kept unless `replace` (force) asks for ours.
 */
async function installImage(stage: string, imageDir: string, work: string, replace: boolean): Promise<void> {
  try {
    await rename(stage, imageDir);
    return;
  } catch (err) {
    if (!isErrnoCode(err, 'ENOTEMPTY') && !isErrnoCode(err, 'EEXIST')) {
      throw new GuestBuildError(`Cannot build guest: cannot install ${imageDir}: ${errorText(err)}`, {
        cause: err,
      });
    }
  }
  if (!replace && (await loadImage(imageDir))) return;
  // Move the old one aside (it is deleted with the work dir), then ours in.
  await rename(imageDir, join(work, 'old')).catch(() => {});
  try {
    await rename(stage, imageDir);
  } catch (err) {
    if (await loadImage(imageDir)) return; // another builder installed an equivalent image meanwhile
    throw new GuestBuildError(`Cannot build guest: cannot install ${imageDir}: ${errorText(err)}`, {
      cause: err,
    });
  }
}

/** Removes work directories left behind by builds that were killed (older than an hour). */
async function removeStaleWorkDirs(cacheDir: string): Promise<void> {
  const names = await readdir(cacheDir).catch(() => [] as string[]);
  for (const name of names.filter((n) => n.startsWith('.build-'))) {
    const dir = join(cacheDir, name);
    const st = await stat(dir).catch(() => null);
    if (st && Date.now() - st.mtimeMs > 3_600_000) await rm(dir, { recursive: true, force: true });
  }
}
