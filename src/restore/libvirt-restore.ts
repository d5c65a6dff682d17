import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { RestoreError, TlcError, VmError } from '../core/errors.js';
import { PRIVATE_DIR_MODE } from '../core/paths.js';
import { SaveImageWriter } from '../libvirt/save-image.js';
import { domainState, virsh } from '../libvirt/virsh.js';
import type { StoredCheckpoint } from '../store/store.js';
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
  opts: { name?: string; trustCheckpointArgs: boolean; log: Log; timeoutMs: number },
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
  const xml = local?.xml ?? saved.xml;
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
    const writer = await SaveImageWriter.create(image, { xml, wasRunning: m.vmWasRunning });
    const stats = await synthesizeStream(ckpt, 'eager', (chunk) => writer.write(chunk));
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
    const pid = Number(fs.readFileSync(`/run/libvirt/qemu/${domain}.pid`, 'utf8').trim());
    const process = identify(pid);
    const consoleLog = /<serial type=["']file["']>\s*<source path=["']([^"']+)["']/.exec(xml)?.[1] ?? '';
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
