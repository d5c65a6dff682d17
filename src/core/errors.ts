/**
 * Every error tlc raises on purpose is a TlcError with a stable `code`. Callers match on `code`
 * (never on message text); the CLI prints `message` as one line and exits non-zero.
 * Subclasses name the phase that failed; the underlying error travels as `cause`.
 */
export type ErrorCode =
  | 'E_USAGE'
  | 'E_GUEST_BUILD'
  | 'E_VM_SPEC'
  | 'E_VM_EXISTS'
  | 'E_VM_NOT_FOUND'
  | 'E_VM_START'
  | 'E_VM_DIED'
  | 'E_ACCEL'
  | 'E_QMP_CONNECT'
  | 'E_QMP_GREETING'
  | 'E_QMP_NEGOTIATE'
  | 'E_QMP_EXECUTE'
  | 'E_QMP_TIMEOUT'
  | 'E_QMP_CLOSED'
  | 'E_STREAM'
  | 'E_CHECKPOINT'
  | 'E_PERSIST'
  | 'E_STORE'
  | 'E_NOT_FOUND'
  | 'E_CORRUPT'
  | 'E_MISMATCH'
  | 'E_RESTORE'
  | 'E_INTERRUPTED'
  | 'E_UNTRUSTED'
  | 'E_MS_CONNECT'
  | 'E_MS_AUTH'
  | 'E_MS_PROTOCOL'
  | 'E_MS_REMOTE'
  | 'E_MS_CLOSED'
  | 'E_MS_TIMEOUT';

export class TlcError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

export class UsageError extends TlcError {
  constructor(message: string) {
    super('E_USAGE', message);
  }
}

export class GuestBuildError extends TlcError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('E_GUEST_BUILD', message, options);
  }
}

export class VmError extends TlcError {}

export type QmpErrorCode =
  'E_QMP_CONNECT' | 'E_QMP_GREETING' | 'E_QMP_NEGOTIATE' | 'E_QMP_EXECUTE' | 'E_QMP_TIMEOUT' | 'E_QMP_CLOSED';

export class QmpError extends TlcError {
  /** QEMU's error class (`GenericError`, `CommandNotFound`, ...) when QEMU answered with an error. */
  readonly qmpClass: string | undefined;
  constructor(code: QmpErrorCode, message: string, options?: { cause?: unknown; qmpClass?: string }) {
    super(code, message, options);
    this.qmpClass = options?.qmpClass;
  }
}

/** A malformed, truncated or unsupported migration stream. `offset` is the stream byte offset. */
export class StreamError extends TlcError {
  readonly offset: number;
  constructor(message: string, offset: number, options?: { cause?: unknown }) {
    super('E_STREAM', `${message} (at stream offset ${offset})`, options);
    this.offset = offset;
  }
}

export class CheckpointError extends TlcError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('E_CHECKPOINT', message, options);
  }
}

/** A signal (Ctrl-C, SIGTERM, SIGHUP) ended the work; the message says what was undone. */
export class InterruptedError extends TlcError {
  readonly signal: NodeJS.Signals;
  constructor(signal: NodeJS.Signals, message = `interrupted by ${signal}`) {
    super('E_INTERRUPTED', message);
    this.signal = signal;
  }
}

/** Writing a checkpoint to durable storage failed: names the call and the path. */
export class PersistError extends TlcError {
  constructor(call: string, path: string, cause: unknown) {
    super('E_PERSIST', `Cannot ${call} ${path}: ${errorText(cause)}`, { cause });
  }
}

export class StoreError extends TlcError {}

export class RestoreError extends TlcError {}

export function errorText(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

export function isErrnoCode(err: unknown, code: string): boolean {
  return typeof err === 'object' && err !== null && (err as NodeJS.ErrnoException).code === code;
}
