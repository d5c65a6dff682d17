import type { Command } from 'commander';
import { takeCheckpoint } from '../checkpoint/take.js';
import { interruptible } from './interrupt.js';
import { TlcError, UsageError, errorText } from '../core/errors.js';
import type { CheckpointMode, Manifest } from '../store/manifest.js';
import { checkSignature, loadSigningKey } from '../store/sign.js';
import { CheckpointStore, type DiskChain, type StoredCheckpoint, diskLayerBytes } from '../store/store.js';
import { type VmRecord, listVms, vmState } from '../vm/registry.js';
import { type VerifyReport, assertVerified, verifyCheckpoint } from '../store/verify.js';
import { verifyRamChain } from '../store/verify-chain.js';
import { pushChain } from '../ms/remote-store.js';
import { formatBytes, formatMs, note, printJson, printTable } from './output.js';
import { connectServers } from './remote.js';
import { ProgressLine } from './progress.js';
import { parseDuration, parseRate } from './units.js';

interface StoreFlags {
  store?: string;
  json?: boolean;
}

interface KeyFlags {
  signKey?: string;
  allowUnsigned?: boolean;
}

function storeOf(o: StoreFlags): CheckpointStore {
  return new CheckpointStore(o.store);
}

function parseMode(value: string): CheckpointMode | 'auto' {
  if (value === 'live' || value === 'cow' || value === 'stop' || value === 'auto') return value;
  throw new UsageError(`--mode must be live, cow, stop or auto (got "${value}")`);
}

const STORE_HELP = 'checkpoint store directory (default: $TLC_STORE or ~/.local/share/tlc/checkpoints)';
const SIGN_KEY_HELP = 'signing key file (default: $TLC_SIGN_KEY, else ~/.config/tlc/sign.key if it exists)';
const REF_HELP = 'id, VM name (its newest), or unique id prefix';

/** The configured signing key for commands that only check signatures (never creates one). */
function checkingKey(o: KeyFlags): Buffer | undefined {
  return loadSigningKey({ ...(o.signKey ? { keyFile: o.signKey } : {}), create: false })?.key;
}

/** One phrase for a signature status: "signed (key 0123…), valid", "UNSIGNED", ... */
export function describeSignature(status: VerifyReport['signature'], keyId: string | undefined): string {
  switch (status) {
    case 'valid':
      return `signed (key ${keyId}), valid`;
    case 'no-key':
      return `signed (key ${keyId}), not checked: no signing key (--sign-key FILE or $TLC_SIGN_KEY)`;
    case 'unsigned':
      return 'UNSIGNED';
    case 'invalid':
      return `signed (key ${keyId}), INVALID`;
  }
}

export function printStages(m: Manifest, print: (line: string) => void): void {
  const x = m.metrics;
  print(`checkpoint ${m.id} (${m.mode}) of VM ${m.vm.name}`);
  print(`  setup time          ${formatMs(x.setupMs)}`);
  print(`  stage 1 (full pass) ${formatMs(x.stage1.ms)}, ${formatBytes(x.stage1.bytes)}`);
  print(
    `  stage 2 (dirty)     ${x.stage2.iterations} iterations, ${formatMs(x.stage2.ms)}, ${formatBytes(x.stage2.bytes)}`,
  );
  print(
    `  stage 3 (stopped)   ${formatBytes(x.stage3.bytes)}, downtime ${x.stage3.downtimeMs.toFixed(1)} ms` +
      (x.qemuDowntimeMs !== undefined ? ` (QEMU reports ${x.qemuDowntimeMs} ms)` : ''),
  );
  if (x.disk)
    print(
      `  disk step           pause ${x.disk.pauseMs.toFixed(1)} ms (the VM stopped for it), ` +
        `${formatBytes(x.disk.copiedBytes)} copied in ${formatMs(x.disk.copyMs)}`,
    );
  if (x.tcgFixup)
    print(
      `  TCG fix-up          ${x.tcgFixup.pages} stale pages replaced from guest RAM in ${formatMs(x.tcgFixup.ms)}`,
    );
  if (x.control) {
    const c = x.control;
    print(
      `  deadline            ${formatMs(c.deadlineMs)}, ${c.metDeadline ? 'met' : 'MISSED'}; max vCPU throttle ${c.maxThrottlePct}%` +
        (c.forcedSwitchover
          ? `; switchover forced at ${formatMs(c.forcedSwitchover.atMs)} (expected downtime ${c.forcedSwitchover.expectedDowntimeMs} ms, paid ${x.stage3.downtimeMs.toFixed(0)} ms)`
          : '; QEMU converged on its own'),
    );
    if (c.plannedDowntimeMs !== undefined)
      print(
        `  downtime plan       ${formatMs(c.plannedDowntimeMs)} (preferred, or stop-and-save ~${formatMs(c.stopAndSaveMs ?? 0)} if less)` +
          (x.tcgFixup ? ', TCG fix-up included' : ''),
      );
    if (!c.metDeadline && c.missedBecause) print(`  deadline missed     ${c.missedBecause}`);
  }
  print(`  total time          ${formatMs(x.totalMs)}`);
  print(`  durable after       ${formatMs(x.durableMs)}`);
  print(`  received ${formatBytes(x.bytesReceived)}, stored ${formatBytes(x.bytesStored)}`);
}

export function registerCheckpointCommands(program: Command): void {
  program
    .command('checkpoint')
    .description('take a checkpoint of a running VM while it keeps running')
    .argument('<vm>', 'VM name')
    .option(
      '--mode <live|cow|stop|auto>',
      'live: pre-copy; cow: background snapshot (state at start); stop: stop, save, continue; auto: live or cow by dirty rate',
      'live',
    )
    .option('--max-downtime <duration>', 'downtime the VM may be stopped at the end (live mode)', '300ms')
    .option('--deadline <duration>', 'live mode: the VM runs again within this long (default: from RAM size)')
    .option('--max-bandwidth <rate>', "cap QEMU's send rate, e.g. 64MiB/s (default: unlimited)")
    .option('--timeout <duration>', 'give up (the VM keeps running) after this long', '10m')
    .option(
      '--allow-inconsistent-disks',
      'checkpoint even if a writable disk cannot be saved at the same instant (it is marked not captured)',
    )
    .option(
      '--sign-key <file>',
      'HMAC key to sign the checkpoint with (default: $TLC_SIGN_KEY or ~/.config/tlc/sign.key, created on first use)',
    )
    .option('--full', "store every page (default: only pages changed since the VM's newest checkpoint)")
    .option('--no-deltas', 'store changed pages whole, never as sub-page deltas against the parent')
    .option(
      '--servers <list>',
      'also commit the checkpoint to these memory servers (HOST:PORT,...; see tlc push)',
    )
    .option('--replicas <n>', 'with --servers: copies of every extent, on distinct servers', '1')
    .option('--secret-file <file>', 'with --servers: their shared secret (default: $TLC_MS_SECRET_FILE)')
    .option('--store <dir>', STORE_HELP)
    .option('--json', 'print the manifest as JSON')
    .action(async (vm: string, o: StoreFlags & Record<string, string | undefined>) => {
      // Connect first: a wrong secret or no reachable server fails before the VM is touched.
      const servers = o.servers
        ? await connectServers({
            servers: o.servers,
            ...(o.replicas ? { replicas: o.replicas } : {}),
            ...(o.secretFile ? { secretFile: o.secretFile } : {}),
          })
        : undefined;
      const progress = new ProgressLine();
      try {
        const ckpt = await interruptible((signal) =>
          takeCheckpoint({
            signal,
            vm,
            ...(o.signKey ? { signKeyFile: o.signKey } : {}),
            allowInconsistentDisks: Boolean(o.allowInconsistentDisks),
            mode: parseMode(o.mode as string),
            store: storeOf(o),
            maxDowntimeMs: parseDuration(o.maxDowntime as string, '--max-downtime'),
            ...(o.deadline ? { deadlineMs: parseDuration(o.deadline, '--deadline') } : {}),
            ...(o.maxBandwidth ? { maxBandwidthBps: parseRate(o.maxBandwidth, '--max-bandwidth') } : {}),
            timeoutMs: parseDuration(o.timeout as string, '--timeout'),
            full: Boolean(o.full),
            ...((o.deltas as unknown) === false ? { subPageDeltas: false } : {}),
            onProgress: progress.update,
            onStage: progress.line,
          }),
        );
        progress.done();
        if (servers) {
          const started = performance.now();
          const pushed = await pushChain(ckpt, storeOf(o), servers);
          const last = pushed.at(-1);
          note(
            `committed to ${last?.committedOn.length ?? 0} memory servers in ${formatMs(performance.now() - started)}` +
              ` (${pushed.map((p) => p.id).join(', ')}; ${formatBytes(pushed.reduce((a, p) => a + p.bytesSent, 0))} sent)`,
          );
          for (const f of last?.failed ?? []) note(`  WARNING: ${f.url}: ${f.error}`);
        }
        if (o.json) printJson(ckpt.manifest);
        else {
          printStages(ckpt.manifest, note);
          process.stdout.write(ckpt.id + '\n');
        }
      } finally {
        servers?.close();
        progress.done();
      }
    });

  program
    .command('ls')
    .description('list checkpoints')
    .option('--store <dir>', STORE_HELP)
    .option('--json', 'print as JSON')
    .action((o: StoreFlags) => {
      const all = storeOf(o).list();
      const chainBytes = chainBytesOf(all);
      if (o.json)
        return printJson(
          all.map((c) => ({
            id: c.id,
            dir: c.dir,
            ...summary(c.manifest),
            parent: c.manifest.parent ?? null,
            storedBytes: storedBytesOf(c.manifest),
            chainBytes: chainBytes.get(c.id) ?? null,
          })),
        );
      printTable(
        ['ID', 'VM', 'MODE', 'CREATED', 'RAM', 'PARENT', 'STORED', 'CHAIN', 'DISKS', 'DOWNTIME'],
        all.map((c) => [
          c.id,
          c.manifest.vm.name,
          c.manifest.mode,
          c.manifest.createdAt.replace('T', ' ').slice(0, 19),
          `${c.manifest.vm.memMiB}M`,
          c.manifest.parent ? c.manifest.parent.slice(c.manifest.vm.name.length + 1) : '-',
          formatBytes(storedBytesOf(c.manifest)),
          chainBytes.has(c.id) ? formatBytes(chainBytes.get(c.id) as number) : 'BROKEN',
          diskBytesOf(c.manifest) === undefined ? '-' : formatBytes(diskBytesOf(c.manifest) as number),
          `${c.manifest.metrics.stage3.downtimeMs.toFixed(1)} ms`,
        ]),
      );
    });

  program
    .command('show')
    .description('show a checkpoint: VM, stages, files, signature')
    .argument('<checkpoint>', REF_HELP)
    .option('--store <dir>', STORE_HELP)
    .option('--sign-key <file>', SIGN_KEY_HELP)
    .option('--json', 'print the manifest as JSON')
    .action((ref: string, o: StoreFlags & KeyFlags) => {
      const store = storeOf(o);
      const c = store.resolve(ref);
      const chains = store.diskChains(c);
      if (o.json)
        return printJson({ dir: c.dir, ...c.manifest, ...(c.manifest.disks ? { diskChains: chains } : {}) });
      const out = (line: string): void => void process.stdout.write(line + '\n');
      let signature: string;
      try {
        signature = describeSignature(
          checkSignature(c.manifest, checkingKey(o)),
          c.manifest.signature?.keyId,
        );
      } catch (err) {
        if (!(err instanceof TlcError) || err.code !== 'E_CORRUPT') throw err;
        signature = `INVALID: ${errorText(err)}`;
      }
      printStages(c.manifest, out);
      out(`  directory           ${c.dir}`);
      out(`  signature           ${signature}`);
      out(
        `  QEMU ${c.manifest.qemuVersion}, machine ${c.manifest.machineType}, ${c.manifest.vm.memMiB} MiB, ${c.manifest.vm.cpus} vCPU`,
      );
      if (c.manifest.parent)
        out(`  RAM builds on       ${c.manifest.parent} (incremental: only changed pages stored here)`);
      for (const b of c.manifest.blocks)
        out(
          `  block ${b.name.padEnd(24)} ${formatBytes(b.usedLength).padStart(10)}  ${b.dataPages} data pages` +
            (b.storedPages !== undefined ? `, ${b.storedPages} stored here` : '') +
            (b.deltaPages ? ` (${b.deltaPages} as sub-page deltas, ${formatBytes(b.deltaBytes ?? 0)})` : ''),
        );
      out(
        `  device state        ${formatBytes(c.manifest.device.bytes)} in ${c.manifest.device.sections} sections`,
      );
      for (const line of describeDisks(c, chains)) out(line);
    });

  program
    .command('verify')
    .description("check a checkpoint's signature and re-check every byte against its checksums")
    .argument('<checkpoint>', REF_HELP)
    .option('--store <dir>', STORE_HELP)
    .option('--sign-key <file>', SIGN_KEY_HELP)
    .option('--allow-unsigned', 'accept an unsigned checkpoint even though a signing key is configured')
    .option('--json', 'print the report as JSON')
    .action((ref: string, o: StoreFlags & KeyFlags) => {
      const key = checkingKey(o);
      const store = storeOf(o);
      const ckpt = store.resolve(ref);
      const opts = { ...(key ? { key } : {}), allowUnsigned: Boolean(o.allowUnsigned) };
      const chains = store.diskChains(ckpt);
      const ram = verifyRamChain(store, ckpt, (c) => verifyCheckpoint(c, true, opts));
      const report = verifyDiskChains(store, chains, ram, (parent) => verifyCheckpoint(parent, true, opts));
      if (o.json) printJson({ ...report, chain: ram.chain, damaged: ram.damaged });
      else {
        const allowed = report.signature === 'unsigned' && key && o.allowUnsigned ? ' (allowed)' : '';
        note(`${report.id}: ${describeSignature(report.signature, report.keyId)}${allowed}`);
        for (const chain of chains.filter((d) => d.captured && d.incremental && !d.broken))
          note(
            `${report.id}: disk ${chain.device} builds on ${chain.checkpoints.slice(1).join(' <- ')}, checked too`,
          );
        if (ram.chain.length > 1)
          note(`${report.id}: RAM builds on ${ram.chain.slice(1).join(' <- ')}, checked too`);
        for (const d of ram.damaged)
          note(`${report.id}: ${d.id} is damaged; it breaks ${d.affects.join(', ')}`);
        if (report.ok) note(`${report.id}: ok (${formatBytes(report.bytesChecked)} checked)`);
        for (const p of report.problems) note(`${report.id}: ${p}`);
        if (report.signature === 'unsigned' && !report.ok && key && !o.allowUnsigned)
          note(`${report.id}: --allow-unsigned accepts an unsigned checkpoint`);
      }
      assertVerified(report);
    });

  program
    .command('rm')
    .description('delete checkpoints by exact id, or every checkpoint of a VM with --all')
    .argument('<id...>', 'checkpoint ids, exactly as tlc ls shows them (with --all: one VM name)')
    .option('--all', 'remove every checkpoint of the named VM')
    .option('--store <dir>', STORE_HELP)
    .option('--sign-key <file>', SIGN_KEY_HELP)
    .action((refs: string[], o: StoreFlags & KeyFlags & { all?: boolean }) => {
      const store = storeOf(o);
      if (o.all && refs.length !== 1) {
        throw new UsageError(`rm --all takes exactly one VM name (got ${refs.length})`);
      }
      const doomed = o.all
        ? store
            .list()
            .filter((c) => c.manifest.vm.name === refs[0])
            .map((c) => c.id)
        : refs;
      assertNotInUse(store, doomed, listVms());
      const removed = o.all ? store.removeAllOf(refs[0] as string) : store.removeIds(refs, rewriteKey(o));
      for (const c of removed) note(`removed ${c.id}`);
    });

  program
    .command('prune')
    .description("remove all but a VM's newest checkpoints; later checkpoints keep every page they need")
    .argument('<vm>', 'VM name')
    .requiredOption('--keep <n>', 'how many of the newest checkpoints to keep')
    .option('--store <dir>', STORE_HELP)
    .option('--sign-key <file>', SIGN_KEY_HELP)
    .action((vm: string, o: StoreFlags & KeyFlags & { keep: string }) => {
      const store = storeOf(o);
      const keep = Number(o.keep);
      if (!Number.isInteger(keep) || keep < 1)
        throw new UsageError(`--keep must be a whole number >= 1 (got ${o.keep})`);
      const ofVm = store.list().filter((c) => c.manifest.vm.name === vm);
      assertNotInUse(
        store,
        ofVm.slice(0, Math.max(0, ofVm.length - keep)).map((c) => c.id),
        listVms(),
      );
      const removed = store.prune(vm, keep, rewriteKey(o));
      for (const c of removed) note(`removed ${c.id}`);
      if (removed.length === 0) note(`${vm}: ${ofVm.length} checkpoint(s), nothing to prune`);
    });
}

/** The key that re-signs a signed checkpoint rewritten to keep its chain whole (none: unsigned ones only). */
function rewriteKey(o: KeyFlags): { signKey?: Buffer } {
  const signing = loadSigningKey({ ...(o.signKey ? { keyFile: o.signKey } : {}), create: false });
  return signing ? { signKey: signing.key } : {};
}

function summary(m: Manifest): Record<string, unknown> {
  const diskBytes = diskBytesOf(m);
  return {
    vm: m.vm.name,
    mode: m.mode,
    createdAt: m.createdAt,
    memMiB: m.vm.memMiB,
    ...(diskBytes !== undefined ? { diskBytes } : {}),
    metrics: m.metrics,
  };
}

/** Bytes a checkpoint's own files take (format 1.2 records them; older ones in the metrics). */
function storedBytesOf(m: Manifest): number {
  return m.storedBytes ?? m.metrics.bytesStored;
}

/** Per checkpoint: its own bytes plus its RAM parents'; absent when a parent is not in the list. */
function chainBytesOf(all: readonly StoredCheckpoint[]): Map<string, number> {
  const byId = new Map(all.map((c) => [c.id, c]));
  const out = new Map<string, number>();
  for (const c of all) {
    let total = 0;
    let cur: StoredCheckpoint | undefined = c;
    const seen = new Set<string>();
    while (cur && !seen.has(cur.id)) {
      seen.add(cur.id);
      total += storedBytesOf(cur.manifest);
      if (cur.manifest.parent === undefined) {
        out.set(c.id, total);
        break;
      }
      cur = byId.get(cur.manifest.parent);
    }
  }
  return out;
}

/** Bytes of the disk layers a checkpoint itself stores; undefined when it stores none. */
export function diskBytesOf(m: Manifest): number | undefined {
  const layers = (m.disks ?? []).flatMap((d) => d.layers);
  return layers.length === 0 ? undefined : (m.disks ?? []).reduce((n, d) => n + diskLayerBytes(d), 0);
}

/**
 * `tlc show`'s lines for a checkpoint's disks: device, format, virtual size, bytes stored here and
 * in the whole chain, full or incremental; a disk not captured is said loudly, with why.
 */
export function describeDisks(c: StoredCheckpoint, chains: readonly DiskChain[]): string[] {
  const lines: string[] = [];
  for (const d of chains) {
    const head = `  disk ${d.device.padEnd(14)} ${d.format}, ${formatBytes(d.virtualSize)} virtual: `;
    if (!d.captured) {
      lines.push(`${head}NOT CAPTURED: ${d.reason ?? 'no reason recorded'}`);
      continue;
    }
    const stored = `${formatBytes(d.storedBytes)} stored here`;
    if (!d.incremental) {
      lines.push(`${head}full copy, ${stored}`);
      continue;
    }
    const over = `${head}incremental over ${c.manifest.disks?.find((x) => x.node === d.node)?.parent?.checkpoint}, ${stored}`;
    const n = d.checkpoints.length;
    if (!d.broken) {
      lines.push(`${over}, ${formatBytes(d.chainBytes)} in its chain of ${n} checkpoints`);
      continue;
    }
    // Only part of the chain could be followed: what was found is a lower bound.
    const found = n > 1 ? `, at least ${formatBytes(d.chainBytes)} in its chain` : '';
    lines.push(`${over}${found} (parent ${d.broken.checkpoint} ${d.broken.reason}: NOT RESTORABLE)`);
  }
  // Disks of the VM the manifest has no entry for: checkpoints taken before tlc saved disks.
  for (const disk of c.manifest.vm.disks ?? []) {
    if (chains.some((d) => d.node === disk.node)) continue;
    lines.push(
      `  disk ${disk.device.padEnd(14)} ${disk.format}: NOT CAPTURED: the checkpoint was taken before tlc saved disks`,
    );
  }
  return lines;
}

/**
 * Adds to a verify report what a checkpoint's disk chains need: every parent checkpoint present
 * and itself verified (a restore checks the same and refuses otherwise).
 */
export function verifyDiskChains(
  store: CheckpointStore,
  chains: readonly DiskChain[],
  report: VerifyReport,
  verifyParent: (parent: StoredCheckpoint) => VerifyReport,
): VerifyReport {
  const problems = [...report.problems];
  let bytesChecked = report.bytesChecked;
  const checked = new Set<string>();
  for (const chain of chains) {
    if (!chain.captured) continue;
    if (chain.broken) {
      problems.push(
        `disk ${chain.device}: builds on checkpoint ${chain.broken.checkpoint}, which is ${chain.broken.reason}: not restorable`,
      );
    }
    for (const id of chain.checkpoints.slice(1)) {
      if (checked.has(id)) continue;
      checked.add(id);
      const parent = verifyParent(store.resolve(id));
      bytesChecked += parent.bytesChecked;
      for (const p of parent.problems) problems.push(`disk ${chain.device}: parent ${id}: ${p}`);
    }
  }
  return { ...report, problems, ok: problems.length === 0, bytesChecked };
}

/**
 * Refuses (E_USAGE, naming the VM) to remove a checkpoint that a running VM's disks are backed
 * by: a VM restored from a checkpoint runs on overlays over that checkpoint's layers and over
 * every checkpoint those build on.
 */
export function assertNotInUse(
  store: CheckpointStore,
  ids: readonly string[],
  vms: readonly VmRecord[],
): void {
  const doomed = new Set(ids);
  for (const vm of vms) {
    if (!vm.restoredFrom || (vm.spec.disks ?? []).length === 0 || vmState(vm) !== 'running') continue;
    const used = store.ancestors(vm.restoredFrom).find((id) => doomed.has(id));
    if (used === undefined) continue;
    const via = used === vm.restoredFrom ? '' : ` (restored from ${vm.restoredFrom}, which builds on it)`;
    throw new UsageError(
      `Cannot remove ${used}: running VM ${vm.spec.name}'s disks are backed by its layers${via}; ` +
        `stop the VM first (tlc vm stop ${vm.spec.name})`,
    );
  }
}
