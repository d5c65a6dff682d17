import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { TlcError, errorText } from '../core/errors.js';

const run = promisify(execFile);

export interface QemuBinary {
  binary: string;
  version: string;
}

/** The QEMU binary tlc drives: `$TLC_QEMU`, else `qemu-system-x86_64` from PATH. */
export function qemuBinaryName(): string {
  return process.env.TLC_QEMU || 'qemu-system-x86_64';
}

const cache = new Map<string, Promise<QemuBinary>>();

export function findQemu(binary = qemuBinaryName()): Promise<QemuBinary> {
  let found = cache.get(binary);
  if (!found) {
    found = probe(binary);
    cache.set(binary, found);
  }
  return found;
}

async function probe(binary: string): Promise<QemuBinary> {
  let stdout: string;
  try {
    ({ stdout } = await run(binary, ['--version'], { timeout: 10_000 }));
  } catch (err) {
    throw new TlcError(
      'E_VM_START',
      `Cannot run ${binary}: ${errorText(err)} (install it with: apt-get install qemu-system-x86)`,
      { cause: err },
    );
  }
  const match = /version (\d+\.\d+\.\d+)/.exec(stdout);
  if (!match?.[1])
    throw new TlcError('E_VM_START', `${binary} --version printed no version: ${stdout.trim()}`);
  return { binary, version: match[1] };
}

/** Every machine type name (not aliases) the binary offers. */
export async function listMachines(binary: string): Promise<string[]> {
  const { stdout } = await run(binary, ['-machine', 'help'], { timeout: 10_000 });
  return stdout
    .split('\n')
    .slice(1)
    .map((line) => line.split(/\s+/, 1)[0] ?? '')
    .filter(Boolean);
}

/** Resolves an alias such as `pc` to the versioned machine type QEMU would use (`pc-i440fx-7.2`). */
export async function resolveMachine(binary: string, machine: string): Promise<string> {
  const { stdout } = await run(binary, ['-machine', 'help'], { timeout: 10_000 });
  for (const line of stdout.split('\n')) {
    const [name] = line.split(/\s+/, 1);
    if (name !== machine) continue;
    const alias = /\(alias of ([^)]+)\)/.exec(line);
    return alias?.[1] ?? machine;
  }
  throw new TlcError('E_VM_SPEC', `${binary} does not know machine type "${machine}"`);
}
