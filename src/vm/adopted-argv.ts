import { TlcError } from '../core/errors.js';

/**
 * A QEMU option string (`file,id=ser0,path=/a,,b`) as QEMU parses it: items split at single
 * commas (a doubled comma is a literal one), each `key=value` or a bare value.
 */
export function parseOptionString(s: string): { key: string | undefined; value: string }[] {
  const items: string[] = [''];
  for (let i = 0; i < s.length; i++) {
    const ch = s[i] as string;
    if (ch === ',' && s[i + 1] === ',') {
      items[items.length - 1] += ',';
      i++;
    } else if (ch === ',') items.push('');
    else items[items.length - 1] += ch;
  }
  return items.map((item) => {
    const eq = item.indexOf('=');
    return eq < 0 ? { key: undefined, value: item } : { key: item.slice(0, eq), value: item.slice(eq + 1) };
  });
}

export function formatOptionString(items: { key: string | undefined; value: string }[]): string {
  return items
    .map(({ key, value }) => {
      const v = value.replace(/,/g, ',,');
      return key === undefined ? v : `${key}=${v}`;
    })
    .join(',');
}

function optionValue(s: string, key: string): string | undefined {
  return parseOptionString(s).find((i) => i.key === key)?.value;
}

export interface AdoptedRewrite {
  /** Id of the memory backend that supplies main RAM (`pc.ram` for plain `-m`). */
  ramBlock: string;
  /** `-object` argument for that backend as this launch needs it (e.g. the checkpoint's image). */
  memoryObject: string;
  /** Console log of this launch: file chardevs and `-serial file:` are pointed here. */
  consoleLog: string;
  /**
   * Reopen the original's writable disk images as they are (the checkpoint was taken with
   * `--allow-inconsistent-disks`); otherwise such a command line is refused.
   */
  keepDisks?: boolean;
  /** Original image path → the overlay a restore made for it (tlc captured that disk). */
  diskOverlays?: Record<string, string>;
}

/** Options whose value tlc replaces (monitors, pid file, incoming) or that would detach QEMU. */
const DROP_WITH_VALUE = new Set([
  '-qmp',
  '-monitor',
  '-incoming',
  '-pidfile',
  '-chardev-qmp',
  '-daemonize-fd',
]);
const DROP_FLAG = new Set(['-daemonize', '-S']);

/**
 * Rewrites someone else's QEMU command line for a restart by tlc: their monitors, pid file and
 * `-daemonize` go (tlc adds its own QMP socket); the main RAM backend is replaced by `memoryObject`
 * with the same id, so a checkpoint's image can supply it whatever the block is called; console
 * files are redirected so the original VM's logs are never truncated.
 */
export function rewriteAdoptedArgv(original: readonly string[], r: AdoptedRewrite): string[] {
  const args = original.slice(1).map((a) => (a.startsWith('--') ? a.slice(1) : a));
  // Chardevs that only serve a monitor (`-mon chardev=x`) go with it: their sockets are the
  // original QEMU's, and a restarted one would fight it for the path.
  const monitorChardevs = new Set<string>();
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '-mon') {
      const id = optionValue(args[i + 1] ?? '', 'chardev');
      if (id) monitorChardevs.add(id);
    }
  }
  const out: string[] = [];
  let consoles = 0;
  const consolePath = (): string => (consoles++ === 0 ? r.consoleLog : `${r.consoleLog}.${consoles - 1}`);
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    const value = args[i + 1];
    if (DROP_FLAG.has(arg)) continue;
    if (DROP_WITH_VALUE.has(arg) || arg === '-mon') {
      i++;
      continue;
    }
    if (value === undefined || !arg.startsWith('-')) {
      out.push(arg);
      continue;
    }
    if (arg === '-object') {
      const items = parseOptionString(value);
      const type = items.find((x) => x.key === 'qom-type')?.value ?? items[0]?.value ?? '';
      if (type.startsWith('memory-backend-') && items.some((x) => x.key === 'id' && x.value === r.ramBlock)) {
        i++;
        continue;
      }
    }
    if (arg === '-machine' || arg === '-M') {
      const items = parseOptionString(value).filter((x) => x.key !== 'memory-backend');
      i++;
      if (items.length > 0) out.push(arg, formatOptionString(items));
      continue;
    }
    if (arg === '-chardev') {
      const items = parseOptionString(value);
      const id = items.find((x) => x.key === 'id')?.value;
      i++;
      if (id && monitorChardevs.has(id)) continue;
      if (items[0]?.key === undefined && items[0]?.value === 'file') {
        const path = consolePath();
        out.push(
          arg,
          formatOptionString(items.map((x) => (x.key === 'path' ? { key: 'path', value: path } : x))),
        );
      } else out.push(arg, value);
      continue;
    }
    if (arg === '-serial' && value.startsWith('file:')) {
      out.push(arg, `file:${consolePath()}`);
      i++;
      continue;
    }
    if (arg === '-drive') {
      const items = parseOptionString(value);
      const file = items.find((x) => x.key === 'file')?.value;
      const overlay = file ? r.diskOverlays?.[file] : undefined;
      if (overlay) {
        const rest = items.filter((x) => x.key !== 'file' && x.key !== 'format');
        out.push(
          arg,
          formatOptionString([{ key: 'file', value: overlay }, { key: 'format', value: 'qcow2' }, ...rest]),
        );
        i++;
        continue;
      }
    }
    const readOnly = /(^|,)(readonly|read-only)=on(,|$)|(^|,)media=cdrom(,|$)/.test(value);
    if ((arg === '-drive' || arg === '-blockdev') && !readOnly && !r.keepDisks) {
      // The original's disk images are the original's: a restart on them would write the
      // original VM's disks. Restore gives tlc-managed disks overlays; adopted ones need the same.
      throw new TlcError(
        'E_RESTORE',
        `the adopted command line has a disk (${arg} ${value}); tlc cannot yet give an adopted VM's disks new overlays`,
      );
    }
    out.push(arg, value);
    i++;
  }
  out.push('-object', r.memoryObject, '-machine', `memory-backend=${r.ramBlock}`);
  return out;
}
