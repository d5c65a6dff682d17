import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { TlcError, errorText } from '../core/errors.js';
import { qemuBinaryName } from './qemu.js';

const run = promisify(execFile);

/** The `qemu-img` beside the QEMU binary when there is one, else from PATH. */
export function qemuImgBinary(qemuBinary = qemuBinaryName()): string {
  const beside = path.join(path.dirname(qemuBinary), 'qemu-img');
  return qemuBinary.includes('/') && fs.existsSync(beside) ? beside : 'qemu-img';
}

/** Runs qemu-img; a failure becomes one line with qemu-img's own reason. */
export async function qemuImg(args: string[], what: string): Promise<string> {
  const binary = qemuImgBinary();
  try {
    const { stdout } = await run(binary, args, { timeout: 60_000, env: { ...process.env, LC_ALL: 'C' } });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; code?: unknown };
    if (e.code === 'ENOENT')
      throw new TlcError('E_VM_START', `cannot run ${binary} (install it with: apt-get install qemu-utils)`);
    const why = (e.stderr ?? '').trim().replace(/\s*\n\s*/g, ' ') || errorText(err);
    throw new TlcError('E_PERSIST', `${what}: ${why}`, { cause: err });
  }
}

/**
 * Creates a qcow2 image of `virtualSize` bytes, optionally over `backing` (a qcow2 file, named as
 * it is to be written into the header: relative names resolve from the new image's directory).
 */
export async function createQcow2(file: string, virtualSize: number, backing?: string): Promise<void> {
  const args = ['create', '-q', '-f', 'qcow2'];
  if (backing) args.push('-F', 'qcow2', '-b', backing, '-u');
  args.push(file, String(virtualSize));
  await qemuImg(args, `create ${file}`);
}
