import type { Command } from 'commander';
import { restoreCheckpoint } from '../restore/restore.js';
import { pullChain } from '../ms/remote-store.js';
import { loadSigningKey } from '../store/sign.js';
import { CheckpointStore } from '../store/store.js';
import { connectServers } from './remote.js';
import { parseAccel } from '../vm/accel.js';
import { UsageError } from '../core/errors.js';
import { formatBytes, formatMs, note, printJson } from './output.js';
import { parseDuration } from './units.js';

export function registerRestoreCommand(program: Command): void {
  program
    .command('restore')
    .description('start a VM again from a checkpoint; the guest continues where it was')
    .argument('<checkpoint>', 'id, unique id prefix, or VM name (its newest checkpoint)')
    .option('--name <name>', "name of the restored VM (default: the checkpointed VM's name)")
    .option('--eager', 'stream every page into QEMU instead of mapping the RAM image copy-on-write')
    .option('--verify', 're-hash the whole checkpoint before starting')
    .option('--accel <tcg|kvm>', "accelerator (default: the checkpointed VM's)")
    .option(
      '--trust-checkpoint-args',
      'replay QEMU arguments recorded in the checkpoint when this host has no record of the VM (printed first)',
    )
    .option(
      '--disk-target <dir>',
      "where the restored VM's new disk overlays go (default: the VM's directory)",
    )
    .option(
      '--sign-key <file>',
      'HMAC key that signed the checkpoint (default: $TLC_SIGN_KEY or ~/.config/tlc/sign.key)',
    )
    .option('--allow-unsigned', 'restore a checkpoint that carries no signature although a key is configured')
    .option('--wait-heartbeat', "return only after the restored guest's first heartbeat")
    .option('--timeout <duration>', 'how long to wait for the guest', '60s')
    .option(
      '--servers <list>',
      'first fetch the checkpoint (and its chain) from these memory servers (see tlc pull)',
    )
    .option('--secret-file <file>', 'with --servers: their shared secret (default: $TLC_MS_SECRET_FILE)')
    .option('--store <dir>', 'checkpoint store directory')
    .option('--json', 'print the result as JSON')
    .action(async (ref: string, o: Record<string, string | boolean | undefined>) => {
      const accel = o.accel ? parseAccel(String(o.accel)) : undefined;
      if (accel === 'auto') throw new UsageError('restore --accel must be tcg or kvm');
      const store = new CheckpointStore(o.store ? String(o.store) : undefined);
      if (o.servers) {
        const servers = await connectServers({
          servers: String(o.servers),
          ...(o.secretFile ? { secretFile: String(o.secretFile) } : {}),
        });
        try {
          const started = performance.now();
          const key = loadSigningKey({
            ...(o.signKey ? { keyFile: String(o.signKey) } : {}),
            create: false,
          })?.key;
          const r = await pullChain(ref, servers, store, {
            verify: { ...(key ? { key } : {}), allowUnsigned: Boolean(o.allowUnsigned) },
          });
          note(
            `fetched ${r.pulled.length > 0 ? r.pulled.join(', ') : 'nothing (already here)'} from the memory servers in ` +
              `${formatMs(performance.now() - started)}: ${formatBytes(r.bytes)}, verified`,
          );
        } finally {
          servers.close();
        }
      }
      const restored = await restoreCheckpoint({
        ref,
        store,
        ...(o.name ? { name: String(o.name) } : {}),
        eager: Boolean(o.eager),
        verify: Boolean(o.verify),
        ...(accel ? { accel } : {}),
        waitHeartbeat: Boolean(o.waitHeartbeat),
        trustCheckpointArgs: Boolean(o.trustCheckpointArgs),
        ...(o.signKey ? { signKeyFile: String(o.signKey) } : {}),
        allowUnsigned: Boolean(o.allowUnsigned),
        ...(o.diskTarget ? { diskTarget: String(o.diskTarget) } : {}),
        timeoutMs: parseDuration(String(o.timeout), '--timeout'),
        log: note,
      });
      const result = {
        name: restored.record.spec.name,
        pid: restored.record.process?.pid,
        checkpoint: restored.checkpoint.id,
        mode: restored.mode,
        timeToRunningMs: Math.round(restored.timeToRunningMs * 10) / 10,
        ...(restored.timeToHeartbeatMs !== undefined
          ? { timeToHeartbeatMs: Math.round(restored.timeToHeartbeatMs) }
          : {}),
        streamBytes: restored.stream.bytesWritten,
      };
      if (o.json) printJson(result);
      else
        note(
          `VM ${result.name} restored from ${result.checkpoint} (${result.mode}): running after ${formatMs(result.timeToRunningMs)}`,
        );
    });
}
