import { TlcError, type ErrorCode } from '../core/errors.js';

/**
 * Errors of the memory-server protocol. `code` says which phase failed (connect, auth, framing, a
 * request the server refused, a dropped connection, a timeout); a server's refusal also carries the
 * server's own reason as `remote` so callers can tell "not found" from "incomplete" without reading text.
 */
export class MsError extends TlcError {
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** Bytes that are not a well-formed frame; `offset` is the byte offset in the connection's stream. */
export class ProtocolError extends MsError {
  readonly offset: number;
  constructor(message: string, offset: number) {
    super('E_MS_PROTOCOL', `${message} (at byte ${offset})`);
    this.offset = offset;
  }
}

/** Reasons a server gives in an ERROR frame. Stable strings: they are part of the protocol. */
export const REMOTE_CODES = [
  'version',
  'auth',
  'protocol',
  'bad-request',
  'not-found',
  'exists',
  'incomplete',
  'corrupt',
  'timeout',
  'shutting-down',
  'internal',
] as const;
export type RemoteCode = (typeof REMOTE_CODES)[number];

export function isRemoteCode(value: unknown): value is RemoteCode {
  return typeof value === 'string' && (REMOTE_CODES as readonly string[]).includes(value);
}

/** A server answered a request with an error. */
export class RemoteError extends MsError {
  readonly remote: RemoteCode;
  readonly server: string;
  constructor(server: string, remote: RemoteCode, message: string) {
    super(remote === 'version' || remote === 'auth' ? 'E_MS_AUTH' : 'E_MS_REMOTE', message);
    this.server = server;
    this.remote = remote;
  }
}

/**
 * A server-side refusal: handlers throw it, the connection turns it into an ERROR frame. Anything
 * else a handler throws is reported to the peer as `internal` (and logged in full on the server).
 */
export class Refusal extends Error {
  readonly remote: RemoteCode;
  constructor(remote: RemoteCode, message: string) {
    super(message);
    this.remote = remote;
  }
}
