import { type Command, Option } from 'commander';
import { TlcError, UsageError, errorText } from '../core/errors.js';
import { parseAddress } from '../ms/address.js';
import { readSecretFile } from '../ms/auth.js';
import { MemoryServer } from '../ms/server.js';
import { note } from './output.js';
import { parseDuration, parsePositiveInt, parseSize } from './units.js';

export function registerServeCommand(program: Command): void {
  program
    .command('serve')
    .description(
      'run a memory server: holds shares of checkpoints for other hosts (foreground, logs to stderr)',
    )
    .requiredOption(
      '--listen <url>',
      'where to listen: tcp://HOST:PORT (port 0: any free port) or unix:/PATH',
    )
    .requiredOption('--data <dir>', 'data directory (created; uncommitted leftovers are discarded at start)')
    .requiredOption('--secret-file <file>', 'shared secret for peer authentication (mode 600)')
    .option('--flush-to <dir>', 'also copy committed checkpoints here in the background (shared file system)')
    .option('--idle-timeout <duration>', 'disconnect a peer silent this long', '30s')
    // The spelling of the first design notes; flags carry their unit, so it is kept hidden.
    .addOption(new Option('--idle-timeout-ms <n>', 'disconnect a peer silent this many ms').hideHelp())
    .option(
      '--connection-budget <size>',
      'received data a connection may have waiting for the disk before the server stops reading it',
      '64MiB',
    )
    .option('--json', 'print the ready line as JSON on stdout')
    .action(async (o: Record<string, string | boolean | undefined>) => {
      const listen = parseAddress(String(o.listen), '--listen');
      const secret = readSecretFile(String(o.secretFile));
      const idleTimeoutMs =
        o.idleTimeoutMs !== undefined
          ? parsePositiveInt(String(o.idleTimeoutMs), '--idle-timeout-ms')
          : parseDuration(String(o.idleTimeout), '--idle-timeout');
      const connectionBudget = parseSize(String(o.connectionBudget), '--connection-budget');
      if (connectionBudget < 8 * 1024 * 1024)
        throw new UsageError(
          `--connection-budget must be at least 8MiB (two extents); got ${o.connectionBudget}`,
        );
      const log = (line: string): void => note(`tlc serve: ${line}`);
      let server: MemoryServer;
      try {
        server = await MemoryServer.start({
          listen,
          dataDir: String(o.data),
          secret,
          ...(o.flushTo ? { flushTo: String(o.flushTo) } : {}),
          idleTimeoutMs,
          connectionBudget,
          log,
        });
      } catch (err) {
        throw new TlcError(
          'E_MS_CONNECT',
          `cannot serve on ${String(o.listen)} with data ${String(o.data)}: ${errorText(err)}`,
          {
            cause: err,
          },
        );
      }
      const ready = `listening on ${server.url}, data ${server.store.layout.root}, server id ${server.store.serverId}`;
      log(ready);
      if (o.json)
        process.stdout.write(
          JSON.stringify({
            url: server.url,
            data: server.store.layout.root,
            serverId: server.store.serverId,
          }) + '\n',
        );
      await new Promise<void>((resolve) => {
        const stop = (signal: NodeJS.Signals): void => {
          process.off('SIGTERM', stop);
          process.off('SIGINT', stop);
          log(`${signal}: finishing writes in progress, then stopping`);
          void server.close().then(resolve, (err: unknown) => {
            log(`error while stopping: ${errorText(err)}`);
            process.exitCode = 1;
            resolve();
          });
        };
        process.on('SIGTERM', stop);
        process.on('SIGINT', stop);
      });
      log('stopped');
    });
}
