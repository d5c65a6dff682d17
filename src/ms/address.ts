import { UsageError } from '../core/errors.js';

/** Where a memory server listens or is reached: TCP host and port, or a unix socket path. */
export type Address = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/**
 * Parses `tcp://host:port`, `tcp:host:port`, `host:port` (the short form `--servers` lists use),
 * `unix:/path` or `unix:///path`. IPv6 hosts go in brackets: `tcp://[::1]:7070`.
 */
export function parseAddress(value: string, what = 'address'): Address {
  const v = value.trim();
  if (v.startsWith('unix:')) {
    const p = v.slice('unix:'.length).replace(/^\/\/(?=\/)/, '');
    if (!p.startsWith('/'))
      throw new UsageError(`${what} ${value}: a unix socket needs an absolute path (unix:/path)`);
    return { kind: 'unix', path: p };
  }
  const rest = v.startsWith('tcp://') ? v.slice(6) : v.startsWith('tcp:') ? v.slice(4) : v;
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(rest);
  const host = m?.[1] ?? m?.[2];
  const port = Number(m?.[3]);
  if (!m || !host || !Number.isInteger(port) || port > 65535)
    throw new UsageError(`${what} must be tcp://HOST:PORT or unix:/PATH (got "${value}")`);
  return { kind: 'tcp', host, port };
}

export function formatAddress(a: Address): string {
  if (a.kind === 'unix') return `unix:${a.path}`;
  return `tcp://${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

/** How logs and errors name a server: `host:port` or the socket path. */
export function shortAddress(a: Address): string {
  if (a.kind === 'unix') return a.path;
  return `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}
