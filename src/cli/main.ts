import os from 'node:os';
import { Command, CommanderError } from 'commander';
import { settleAllOwed } from '../checkpoint/owed.js';
import { InterruptedError, TlcError, errorText } from '../core/errors.js';
import { registerCheckpointCommands } from './checkpoint.js';
import { registerDemoCommand } from './demo.js';
import { registerGuestCommands } from './guest.js';
import { registerRestoreCommand } from './restore.js';
import { registerRemoteCommands } from './remote.js';
import { registerServeCommand } from './serve.js';
import { registerVmCommands } from './vm.js';

// Checkpoints and sockets hold guest memory: nothing tlc or its QEMUs create is group/world readable.
process.umask(0o077);

// `tlc ... | head` closes stdout early: that is not an error worth a stack trace.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw err;
});

const program = new Command('tlc')
  .description('Live, time-bound checkpoint and fast restore of running QEMU virtual machines')
  .showHelpAfterError()
  .exitOverride();

// A tlc killed mid-checkpoint (SIGKILL, OOM) could not resume its guest: whichever tlc command
// runs next pays that debt first and says so.
program.hook('preAction', async (_program, command) => {
  if (command.parent?.name() === 'guest' || command.name() === 'guest') return;
  for (const line of await settleAllOwed()) process.stderr.write(`tlc: ${line}\n`);
});

registerGuestCommands(program);
registerVmCommands(program);
registerCheckpointCommands(program);
registerRestoreCommand(program);
registerDemoCommand(program);
registerServeCommand(program);
registerRemoteCommands(program);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    process.exitCode = err.exitCode;
  } else {
    const text = err instanceof TlcError ? err.message : `internal error: ${errorText(err)}`;
    process.stderr.write(`tlc: ${text.split('\n')[0]}\n`);
    if (process.env.TLC_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    process.exitCode =
      err instanceof InterruptedError
        ? 128 + (os.constants.signals[err.signal] ?? 2)
        : err instanceof TlcError && err.code === 'E_USAGE'
          ? 2
          : 1;
  }
}
