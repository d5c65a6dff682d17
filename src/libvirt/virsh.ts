/**
 * Running `virsh`: one process per call, its output collected with a cap, killed by pid on timeout.
 *
 * virsh reports failures only as text (`error: <libvirt message>` on stderr, exit status 1). The
 * message starts with the text libvirt derives from its error code (virErrorMsg: "Domain not
 * found", "Requested operation is not valid", "Timed out during operation", ...), so `libvirtFault`
 * classifies failures by those prefixes; virsh runs with LC_ALL=C so that they are never translated.
 */
import { spawn, type StdioOptions } from 'node:child_process';
import type net from 'node:net';
import { TlcError, type ErrorCode } from '../core/errors.js';

export const DEFAULT_URI = 'qemu:///system';
export const VIRSH = 'virsh';
/** More than any virsh reply tlc asks for (a domain XML, a QMP reply); a longer one is cut off. */
const MAX_OUTPUT_BYTES = 16 * 1024 * 1024;
const DEFAULT_TIMEOUT_MS = 30_000;

/**
 * A failure of libvirt or virsh itself (not of a QMP command). `code` is `E_LIBVIRT`, which is to
 * join ErrorCode in core/errors.ts when this module is wired in; `fault` says what went wrong.
 */
export class LibvirtError extends TlcError {
  readonly fault: LibvirtFault;
  constructor(message: string, fault: LibvirtFault, options?: { cause?: unknown }) {
    super('E_LIBVIRT' as ErrorCode, message, options);
    this.fault = fault;
  }
}

/** What a virsh failure means, from libvirt's error-code text at the start of its message. */
export type LibvirtFault =
  /** The domain does not exist, or is not running (for commands that need a running QEMU). */
  | 'no-domain'
  | 'not-running'
  /** libvirt gave up waiting (a job lock held by someone else, a QEMU that does not answer). */
  | 'timeout'
  /** virsh could not reach the daemon. */
  | 'no-daemon'
  /** virsh was not found or could not be started. */
  | 'no-virsh'
  /** virsh was killed after our own timeout. */
  | 'killed'
  | 'other';

const FAULT_PREFIXES: ReadonlyArray<readonly [string, LibvirtFault]> = [
  ['Domain not found', 'no-domain'],
  // virsh's own message when the lookup by name, id or UUID fails.
  ['failed to get domain', 'no-domain'],
  ['Requested operation is not valid: domain is not running', 'not-running'],
  ['Timed out during operation', 'timeout'],
  ['failed to connect to the hypervisor', 'no-daemon'],
  ['Failed to connect socket', 'no-daemon'],
];

/** Classifies the message of a virsh failure (without the `error: ` prefix). */
export function libvirtFault(message: string): LibvirtFault {
  for (const [prefix, fault] of FAULT_PREFIXES) if (message.startsWith(prefix)) return fault;
  return 'other';
}

export interface VirshResult {
  stdout: string;
  /** libvirt's message, `error: ` prefixes removed, lines joined with '; ' (empty on success). */
  error: string;
  exitCode: number | null;
  /** Wall time from spawn to exit. */
  ms: number;
}

export interface VirshOptions {
  uri?: string;
  timeoutMs?: number;
  /**
   * Descriptors the child gets as fd 3, 4, ... (for `--pass-fds 3,4`). A net.Socket handed to a
   * child this way is no longer read by this process: pass only ends the parent does not read.
   */
  fds?: ReadonlyArray<number | net.Socket>;
  /** Aborting kills virsh (by pid) and rejects with a LibvirtError whose fault is `killed`. */
  signal?: AbortSignal;
}

/** Runs `virsh -c URI ARGS...`; resolves with its output whatever its exit status (see `virsh`). */
export function runVirsh(args: readonly string[], opts: VirshOptions = {}): Promise<VirshResult> {
  const uri = opts.uri ?? DEFAULT_URI;
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const start = performance.now();
  const stdio: StdioOptions = ['ignore', 'pipe', 'pipe', ...(opts.fds ?? [])];
  return new Promise((resolve, reject) => {
    const child = spawn(VIRSH, ['-c', uri, ...args], {
      stdio,
      env: { ...process.env, LC_ALL: 'C', LANG: 'C' },
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outBytes = 0;
    let killedByUs = false;
    const collect = (into: Buffer[]) => (chunk: Buffer) => {
      if (outBytes >= MAX_OUTPUT_BYTES) return;
      outBytes += chunk.length;
      into.push(chunk);
    };
    child.stdout?.on('data', collect(out));
    child.stderr?.on('data', collect(err));
    let why = '';
    const stop = (reason: string): void => {
      if (killedByUs) return;
      killedByUs = true;
      why = reason;
      try {
        if (child.pid !== undefined && child.exitCode === null) process.kill(child.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    };
    const timer = setTimeout(() => stop(`did not finish within ${timeoutMs} ms`), timeoutMs);
    const onAbort = (): void => stop('was cancelled');
    if (opts.signal?.aborted) onAbort();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    const done = (): void => {
      clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
    };
    child.once('error', (e) => {
      done();
      reject(new LibvirtError(`Cannot run ${VIRSH}: ${e.message}`, 'no-virsh', { cause: e }));
    });
    child.once('close', (code) => {
      done();
      const ms = performance.now() - start;
      if (killedByUs) {
        reject(new LibvirtError(`virsh ${commandOf(args)} ${why}`, 'killed'));
        return;
      }
      const error = Buffer.concat(err)
        .toString('utf8')
        .split('\n')
        .map((l) => l.trim().replace(/^error: /, ''))
        .filter((l) => l.length > 0)
        .join('; ');
      resolve({ stdout: Buffer.concat(out).toString('utf8'), error, exitCode: code, ms });
    });
  });
}

/**
 * Runs virsh and returns its stdout; a non-zero exit becomes a LibvirtError naming the command
 * and libvirt's message.
 */
export async function virsh(args: readonly string[], opts: VirshOptions = {}): Promise<string> {
  const r = await runVirsh(args, opts);
  if (r.exitCode !== 0) {
    const message = r.error || `exit status ${r.exitCode}`;
    throw new LibvirtError(`virsh ${commandOf(args)} failed: ${message}`, libvirtFault(r.error));
  }
  return r.stdout;
}

/** The virsh command in `args` (its first word that is not an option), for messages. */
function commandOf(args: readonly string[]): string {
  return args.find((a) => !a.startsWith('-')) ?? VIRSH;
}

export interface DomainInfo {
  name: string;
  uuid: string;
  /** libvirt's id of the running QEMU; undefined when the domain is not running. */
  id: number | undefined;
  /** `running`, `paused`, `shut off`, ... */
  state: string;
}

/** `virsh dominfo DOM` (DOM: a name, id or UUID). */
export async function domainInfo(domain: string, opts: VirshOptions = {}): Promise<DomainInfo> {
  const out = await virsh(['dominfo', domain], opts);
  const field = (name: string): string | undefined =>
    out
      .split('\n')
      .find((l) => l.startsWith(`${name}:`))
      ?.slice(name.length + 1)
      .trim();
  const name = field('Name');
  const uuid = field('UUID');
  const state = field('State');
  if (name === undefined || uuid === undefined || state === undefined) {
    throw new LibvirtError(`virsh dominfo ${domain} printed no Name, UUID or State`, 'other');
  }
  const id = field('Id');
  return { name, uuid, state, id: id !== undefined && /^\d+$/.test(id) ? Number(id) : undefined };
}

/** `virsh domstate DOM`: `running`, `paused`, `shut off`, ... */
export async function domainState(domain: string, opts: VirshOptions = {}): Promise<string> {
  return (await virsh(['domstate', domain], opts)).trim();
}
