import type { Command } from 'commander';
import { buildGuest, defaultGuestCacheDir } from '../guest/build.js';
import { note, printJson } from './output.js';

export function registerGuestCommands(program: Command): void {
  const guest = program.command('guest').description('the bundled test guest');
  guest
    .command('build')
    .description('build the guest (Debian cloud kernel, busybox initramfs, static workloads); cached')
    .option('--dir <path>', 'cache directory', defaultGuestCacheDir())
    .option('--force', 'rebuild even if cached')
    .option('--json', 'print the result as JSON')
    .action(async (o: { dir: string; force?: boolean; json?: boolean }) => {
      const image = await buildGuest({ cacheDir: o.dir, force: Boolean(o.force), log: note });
      if (o.json) printJson(image);
      else note(`guest ready: kernel ${image.kernel}, initrd ${image.initrd}`);
    });
}
