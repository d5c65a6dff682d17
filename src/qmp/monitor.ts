import type { QmpCommandName, QmpCommands, QmpEvent } from './types.js';

/**
 * What tlc needs of a QEMU monitor: QMP commands with typed replies, and events. A QMP socket
 * (QmpClient) and libvirt's monitor passthrough (LibvirtMonitor) both provide it.
 */
export interface Monitor {
  execute<C extends QmpCommandName>(
    command: C,
    args?: QmpCommands[C][0],
    opts?: { timeoutMs?: number },
  ): Promise<QmpCommands[C][1]>;
  on(event: 'event', listener: (ev: QmpEvent) => void): unknown;
  off(event: 'event', listener: (ev: QmpEvent) => void): unknown;
  waitEvent(name: string, timeoutMs: number, match?: (ev: QmpEvent) => boolean): Promise<QmpEvent>;
  close(): void;
  readonly closed: boolean;
}
