import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { RestoreError, TlcError, VmError } from '../core/errors.js';
import { PRIVATE_DIR_MODE } from '../core/paths.js';
import { consoleFromDomainXml, domainPidFile } from '../libvirt/domain-xml.js';
import { SaveImageWriter } from '../libvirt/save-image.js';
import { domainState, virsh } from '../libvirt/virsh.js';
import { restoreDisks } from '../disk/restore-disks.js';
import type { CheckpointStore, StoredCheckpoint } from '../store/store.js';
import { qemuImg } from '../vm/qemu-img.js';
import type { Log } from '../vm/manager.js';
import { identify } from '../vm/process.js';
import { type VmRecord, claimVmName, runtimePaths, saveVm, tryLoadVm } from '../vm/registry.js';
import { validateVmName } from '../vm/spec.js';
import { type SynthesisStats, synthesizeStream } from './synthesize.js';

export interface LibvirtRestored {
  record: VmRecord;
  timeToRunningMs: number;
  stream: SynthesisStats;
}

/**
 * Brings a libvirt domain back under libvirt: the checkpoint becomes a libvirt save image (the
 * `LibvirtQemudSave` header, the domain XML, then a full migration stream) that `virsh restore`
 * loads, so the domain shows `running` in `virsh list` and keeps its own monitor. libvirt reads
 * the whole stream: this restore is eager. The XML is taken from this host's record of the VM; a
 * checkpoint's own XML (which libvirt would run, `<qemu:commandline>` included) only when trusted.
 */
export async function restoreLibvirtDomain(
  ckpt: StoredCheckpoint,
  opts: {
    name?: string;
    trustCheckpointArgs: boolean;
    log: Log;
    timeoutMs: number;
    store: CheckpointStore;
    verifyParent: (parent: StoredCheckpoint) => void;
    /** `ckpt` and the checkpoints its RAM builds on, newest first. */
    ramChain?: readonly StoredCheckpoint[];
    /** Where the restored domain's disks go (default /var/lib/libvirt/images/tlc-restore). */
    diskTarget?: string;
  },
): Promise<LibvirtRestored> {
  const m = ckpt.manifest;
  const saved = m.vm.libvirt;
  if (!saved) throw new RestoreError('E_RESTORE', `${ckpt.id} is not a checkpoint of a libvirt domain`);
  const name = validateVmName(opts.name ?? m.vm.name);
  const local = tryLoadVm(m.vm.name)?.spec.libvirt;
  if (!local && !opts.trustCheckpointArgs) {
    throw new RestoreError(
      'E_UNTRUSTED',
      `${ckpt.id} carries libvirt domain XML for "${saved.domain}" and this host has no record of it; ` +
        'check it with tlc show --json and pass --trust-checkpoint-args to let libvirt run it',
    );
  }
  let xml = local?.xml ?? saved.xml;
  const { domain, uri } = local ?? saved;
  if (!opts.trustCheckpointArgs && local && local.domain !== saved.domain) {
    throw new RestoreError(
      'E_MISMATCH',
      `${ckpt.id} is of domain ${saved.domain}, this host's VM ${m.vm.name} is ${local.domain}`,
    );
  }
  const state = await domainState(domain, { uri }).catch(() => 'undefined');
  if (state === 'running' || state === 'paused') {
    throw new VmError(
      'E_VM_EXISTS',
      `libvirt domain ${domain} is ${state}; stop it first (virsh destroy ${domain})`,
    );
  }
  claimVmName(name);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-libvirt-restore-'));
  fs.chmodSync(dir, PRIVATE_DIR_MODE);
  const image = path.join(dir, `${domain}.save`);
  try {
    xml = await restoredDisks(ckpt, xml, dir, { ...opts, vmName: name });
    const writer = await SaveImageWriter.create(image, { xml, wasRunning: m.vmWasRunning });
    const stats = await synthesizeStream(
      ckpt,
      'eager',
      (chunk) => writer.write(chunk),
      opts.ramChain ?? [ckpt],
    );
    await writer.finish();
    opts.log(`save image for libvirt written: ${(stats.bytesWritten / 2 ** 20).toFixed(1)} MiB`);
    const started = performance.now();
    await virsh(['restore', image], { uri, timeoutMs: opts.timeoutMs });
    const want = m.vmWasRunning ? 'running' : 'paused';
    const deadline = Date.now() + opts.timeoutMs;
    while ((await domainState(domain, { uri })) !== want) {
      if (Date.now() > deadline)
        throw new RestoreError('E_RESTORE', `libvirt domain ${domain} is not ${want} after virsh restore`);
      await sleep(20);
    }
    const timeToRunningMs = performance.now() - started;
    const pid = Number(fs.readFileSync(domainPidFile(domain, uri), 'utf8').trim());
    const process = identify(pid);
    const consoleLog = consoleFromDomainXml(xml) ?? '';
    const record: VmRecord = {
      spec: { ...m.vm, name, libvirt: { domain, uri, xml } },
      paths: { ...runtimePaths(name), qmpSocket: '', consoleLog },
      ...(process ? { process } : {}),
      startedAt: new Date().toISOString(),
      adopted: true,
      restoredFrom: ckpt.id,
      libvirt: { domain, uri },
    };
    saveVm(record);
    opts.log(`libvirt domain ${domain} ${want} ${timeToRunningMs.toFixed(0)} ms after virsh restore began`);
    return { record, timeToRunningMs, stream: stats };
  } catch (err) {
    throw err instanceof TlcError
      ? err
      : new RestoreError('E_RESTORE', `virsh restore of ${ckpt.id} failed: ${String(err)}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Gives the domain's captured disks their checkpoint content: the layer chain (checked by
 * restoreDisks) is flattened into one new qcow2 per disk where libvirt's QEMU may open it, and the
 * domain XML is pointed at it. A flat copy, because libvirt's QEMU runs as another user and
 * cannot read backing files inside tlc's private store (and libvirt would relabel them).
 */
async function restoredDisks(
  ckpt: StoredCheckpoint,
  xml: string,
  scratch: string,
  opts: {
    store: CheckpointStore;
    vmName: string;
    log: Log;
    verifyParent: (p: StoredCheckpoint) => void;
    diskTarget?: string;
  },
): Promise<string> {
  const overlays = await restoreDisks({
    ckpt,
    store: opts.store,
    targetDir: scratch,
    vmName: opts.vmName,
    log: () => undefined,
    verifyParent: opts.verifyParent,
  });
  const captured = ckpt.manifest.disks?.filter((d) => d.captured) ?? [];
  if (captured.some((d) => !d.path)) {
    // Never start the domain on its live image with RAM from another time.
    throw new RestoreError(
      'E_RESTORE',
      `${ckpt.id} has a captured disk without its image path; cannot restore it under libvirt`,
    );
  }
  const target = opts.diskTarget ?? '/var/lib/libvirt/images/tlc-restore';
  fs.mkdirSync(target, { recursive: true });
  // libvirt's QEMU (another user) must reach the image; libvirt itself chowns the file.
  fs.chmodSync(target, 0o711);
  const stamp = new Date().toISOString().replace(/[-:.]/g, '').replace('T', '-').slice(0, 18);
  for (const [i, d] of overlays.entries()) {
    if (!d.original) continue;
    const flat = path.join(target, `${opts.vmName}-disk${i}-${stamp}.qcow2`);
    await qemuImg(['convert', '-q', '-O', 'qcow2', d.disk.path, flat], `copy disk ${d.original}`);
    fs.chmodSync(flat, 0o600);
    const next = replaceDiskSource(xml, d.original, flat);
    if (next === xml)
      throw new RestoreError('E_RESTORE', `the domain XML has no disk with source ${d.original}`);
    xml = next;
    opts.log(`disk ${d.original}: restored into ${flat}`);
  }
  return xml;
}

/** Points the `<disk>` whose source is `from` at the qcow2 image `to`. */
export function replaceDiskSource(xml: string, from: string, to: string): string {
  const esc = (s: string): string =>
    s.replace(/&/g, '&amp;').replace(/'/g, '&apos;').replace(/"/g, '&quot;').replace(/</g, '&lt;');
  return xml.replace(/<disk\b[\s\S]*?<\/disk>/g, (block) => {
    if (!block.includes(`file='${esc(from)}'`) && !block.includes(`file="${esc(from)}"`)) return block;
    return block
      .replace(/<backingStore\b[^/>]*>[\s\S]*?<\/backingStore>/g, '<backingStore/>')
      .replace(/file=(['"])[^'"]*\1/, `file='${esc(to)}'`)
      .replace(/(<driver\b[^>]*\btype=)(['"])[^'"]*\2/, "$1'qcow2'");
  });
}
