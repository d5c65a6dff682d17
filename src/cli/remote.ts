import type { Command } from 'commander';
import { UsageError } from '../core/errors.js';
import { readSecretFile } from '../ms/auth.js';
import { pullChain, pushChain } from '../ms/remote-store.js';
import { ServerSet } from '../ms/serverset.js';
import { loadSigningKey } from '../store/sign.js';
import { CheckpointStore } from '../store/store.js';
import { formatBytes, formatMs, note, printJson, printTable } from './output.js';
import { parsePositiveInt } from './units.js';

export interface ServerOptions {
  servers?: string;
  replicas?: string;
  secretFile?: string;
}

/** `--servers h1:7070,h2:7070` (tcp:// implied) → URLs. */
function serverUrls(list: string): string[] {
  const urls = list
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => (s.includes('://') || s.startsWith('unix:') ? s : `tcp://${s}`));
  if (urls.length === 0) throw new UsageError('--servers needs at least one HOST:PORT');
  return urls;
}

/** Connects to the memory servers a command names (`--servers`, `--secret-file` or $TLC_MS_SECRET_FILE). */
export async function connectServers(o: ServerOptions): Promise<ServerSet> {
  if (!o.servers) throw new UsageError('--servers is required');
  const secretFile = o.secretFile ?? process.env.TLC_MS_SECRET_FILE;
  if (!secretFile) throw new UsageError('memory servers need --secret-file FILE (or $TLC_MS_SECRET_FILE)');
  const replicas = o.replicas ? parsePositiveInt(o.replicas, '--replicas') : 1;
  return ServerSet.connect(serverUrls(o.servers), { secret: readSecretFile(secretFile), replicas });
}

function serverFlags(cmd: Command, withReplicas: boolean): Command {
  cmd
    .requiredOption('--servers <list>', 'memory servers, HOST:PORT[,HOST:PORT...] (tlc serve)')
    .option('--secret-file <file>', 'shared secret of the servers (default: $TLC_MS_SECRET_FILE)');
  if (withReplicas) cmd.option('--replicas <n>', 'copies of every extent, on distinct servers', '1');
  return cmd.option('--store <dir>', 'local checkpoint store').option('--json', 'print the result as JSON');
}

export function registerRemoteCommands(program: Command): void {
  serverFlags(
    program
      .command('push')
      .description(
        'copy a checkpoint to memory servers: RAM striped in 1 MiB extents, replicated, committed on all',
      )
      .argument('<checkpoint>', 'checkpoint id or VM name (its newest)'),
    true,
  ).action(async (ref: string, o: ServerOptions & { store?: string; json?: boolean }) => {
    const store = new CheckpointStore(o.store);
    const ckpt = store.resolve(ref);
    const servers = await connectServers(o);
    try {
      const started = performance.now();
      const reports = await pushChain(ckpt, store, servers, (line) => note(`  ${line}`));
      const ms = performance.now() - started;
      const r = reports.at(-1) as (typeof reports)[number];
      if (o.json) printJson({ ...r, ms, pushed: reports.map((x) => x.id) });
      else {
        for (const x of reports.slice(0, -1)) note(`pushed parent ${x.id}: ${formatBytes(x.bytesSent)}`);
        note(
          `pushed ${r.id}: ${r.files} files, ${r.extents} extents, ${formatBytes(r.bytesSent)} in ${formatMs(ms)}; ` +
            `committed on ${r.committedOn.join(', ')}`,
        );
        for (const f of r.failed) note(`  WARNING: ${f.url}: ${f.error}`);
      }
    } finally {
      servers.close();
    }
  });

  serverFlags(
    program
      .command('pull')
      .description(
        'fetch a checkpoint from memory servers into the local store (all servers at once), verified',
      )
      .argument('<id>', 'checkpoint id on the servers'),
    false,
  )
    .option('--allow-unsigned', 'accept a checkpoint without a signature although a key is configured')
    .action(
      async (id: string, o: ServerOptions & { store?: string; json?: boolean; allowUnsigned?: boolean }) => {
        const store = new CheckpointStore(o.store);
        const servers = await connectServers(o);
        try {
          const started = performance.now();
          const key = loadSigningKey({ create: false })?.key;
          const r = await pullChain(id, servers, store, {
            verify: { ...(key ? { key } : {}), allowUnsigned: Boolean(o.allowUnsigned) },
            onProgress: (line) => note(`  ${line}`),
          });
          const ms = performance.now() - started;
          if (o.json)
            printJson({
              id,
              dir: r.ckpt.dir,
              bytes: r.bytes,
              ms,
              pulled: r.pulled,
              extentsFrom: r.fromServers,
            });
          else
            note(
              `pulled ${id} into ${r.ckpt.dir}: ${formatBytes(r.bytes)} in ${formatMs(ms)}, verified; extents from ` +
                Object.entries(r.fromServers)
                  .map(([url, n]) => `${url} (${n})`)
                  .join(', '),
            );
        } finally {
          servers.close();
        }
      },
    );

  const remote = program.command('remote').description('checkpoints held by memory servers');
  serverFlags(
    remote.command('ls').description('list the checkpoints the servers hold (any reachable server answers)'),
    false,
  ).action(async (o: ServerOptions & { json?: boolean }) => {
    const servers = await connectServers(o);
    try {
      const list = await servers.list();
      if (o.json) printJson({ checkpoints: list, down: servers.down });
      else {
        printTable(
          ['ID', 'COMMITTED', 'SERVERS'],
          list.map((c) => [c.id, c.committedAt, c.servers.join(',')]),
        );
        for (const d of servers.down) note(`WARNING: ${d.url} is down: ${d.error}`);
      }
    } finally {
      servers.close();
    }
  });
  serverFlags(
    remote
      .command('rm')
      .description('remove a checkpoint from every reachable server')
      .argument('<id>', 'checkpoint id'),
    false,
  ).action(async (id: string, o: ServerOptions & { json?: boolean }) => {
    const servers = await connectServers(o);
    try {
      const r = await servers.remove(id);
      if (o.json) printJson(r);
      else
        note(`removed ${id} from ${r.removed.length > 0 ? r.removed.join(', ') : 'no server (not found)'}`);
      for (const f of r.failed) note(`WARNING: ${f.url}: ${f.error}`);
    } finally {
      servers.close();
    }
  });
}
