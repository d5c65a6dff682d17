/** What every benchmark script needs around its measurements: private state, cleanup, output. */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { stopVm } from '../vm/manager.js';

/**
 * A private TLC_HOME and TLC_STORE under a fresh temp directory. `run` executes `main` and then
 * stops every VM started there (by pid, through the registry) and removes the directory.
 */
export function benchWorkspace(prefix: string): {
  base: string;
  run: (main: () => Promise<void>) => Promise<void>;
} {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), `tlc-bench-${prefix}-`));
  process.env.TLC_HOME = path.join(base, 'home');
  process.env.TLC_STORE = path.join(base, 'store');
  return {
    base,
    run: async (main) => {
      try {
        await main();
      } finally {
        const vms = path.join(base, 'home', 'vms');
        for (const entry of fs.existsSync(vms) ? fs.readdirSync(vms) : []) {
          await stopVm(entry, { force: true }).catch(() => undefined);
        }
        fs.rmSync(base, { recursive: true, force: true });
      }
    },
  };
}

export interface MachineStamp {
  revision: string;
  host: string;
  cpus: number;
  cpu: string;
  memGiB: number;
  date: string;
}

/** Revision and machine, stamped on every result file. */
export function machineStamp(): MachineStamp {
  return {
    revision: execFileSync('git', ['describe', '--always', '--dirty'], { encoding: 'utf8' }).trim(),
    host: os.hostname(),
    cpus: os.cpus().length,
    cpu: os.cpus()[0]?.model ?? '',
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    date: new Date().toISOString(),
  };
}

/** Writes `bench/out/<name>-<date>.<ext>` and returns its path. */
export function saveResult(name: string, date: string, ext: string, content: string): string {
  fs.mkdirSync('bench/out', { recursive: true });
  const file = path.join('bench/out', `${name}-${date.replace(/[:.]/g, '-')}.${ext}`);
  fs.writeFileSync(file, content);
  return file;
}
