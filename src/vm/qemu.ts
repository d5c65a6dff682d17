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

/** `-machine help`, once per binary: machine type name → the type it is an alias of, if any. */
const machineTables = new Map<string, Promise<Map<string, string | undefined>>>();

function machineTable(binary: string): Promise<Map<string, string | undefined>> {
  let table = machineTables.get(binary);
  if (!table) {
    table = run(binary, ['-machine', 'help'], { timeout: 10_000 }).then(({ stdout }) => {
      const names = new Map<string, string | undefined>();
      for (const line of stdout.split('\n').slice(1)) {
        const [name] = line.split(/\s+/, 1);
        if (name) names.set(name, /\(alias of ([^)]+)\)/.exec(line)?.[1]);
      }
      return names;
    });
    machineTables.set(binary, table);
  }
  return table;
}

/** Every machine type name the binary offers (aliases included). */
export async function listMachines(binary: string): Promise<string[]> {
  return [...(await machineTable(binary)).keys()];
}

/** Resolves an alias such as `pc` to the versioned machine type QEMU would use (`pc-i440fx-7.2`). */
export async function resolveMachine(binary: string, machine: string): Promise<string> {
  const table = await machineTable(binary);
  if (!table.has(machine))
    throw new TlcError('E_VM_SPEC', `${binary} does not know machine type "${machine}"`);
  return table.get(machine) ?? machine;
}
