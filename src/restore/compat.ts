import { TlcError } from '../core/errors.js';
import type { Manifest } from '../store/manifest.js';
import { ramBlockOf } from '../vm/spec.js';
import type { QemuBinary } from '../vm/qemu.js';

/**
 * Refuses a restore that QEMU would reject half-way or, worse, accept wrongly: device state is
 * tied to the exact QEMU version and machine type, and the RAM block list must match.
 * Returns the problems as one-line messages (empty when compatible).
 */
export function compatibilityProblems(
  m: Manifest,
  qemu: QemuBinary,
  knownMachines: readonly string[],
): string[] {
  const problems: string[] = [];
  if (m.qemuVersion !== qemu.version) {
    problems.push(
      `checkpoint was taken with QEMU ${m.qemuVersion}, but ${qemu.binary} is QEMU ${qemu.version}`,
    );
  }
  if (!knownMachines.includes(m.machineType)) {
    problems.push(`machine type ${m.machineType} is not available in ${qemu.binary}`);
  }
  const ramBlock = ramBlockOf(m.vm);
  const ram = m.blocks.find((b) => b.name === ramBlock);
  if (!ram) problems.push(`checkpoint has no RAM block "${ramBlock}", which holds the VM's main RAM`);
  else if (ram.usedLength !== m.vm.memMiB * 1024 * 1024) {
    problems.push(`RAM block ${ramBlock} is ${ram.usedLength} bytes but the VM spec says ${m.vm.memMiB} MiB`);
  }
  return problems;
}

export function assertCompatible(m: Manifest, qemu: QemuBinary, knownMachines: readonly string[]): void {
  const problems = compatibilityProblems(m, qemu, knownMachines);
  if (problems.length > 0) throw new TlcError('E_MISMATCH', `Cannot restore ${m.id}: ${problems.join('; ')}`);
}
