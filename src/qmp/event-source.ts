import { EventEmitter, on } from 'node:events';
import { QmpError } from '../core/errors.js';
import type { QmpEvent } from './types.js';

/**
 * QMP events as a monitor delivers them, whatever carries them (a QMP socket, libvirt's
 * passthrough): subclasses emit `event` per QMP event and `close` once when the monitor is gone.
 */
export abstract class QmpEventSource extends EventEmitter {
  abstract get closed(): boolean;

  /** Events as an async iterator; ends when the monitor closes. */
  async *events(signal?: AbortSignal): AsyncGenerator<QmpEvent> {
    // A generator body starts at the first next(): the monitor may have closed by then.
    if (this.closed) return;
    const ac = new AbortController();
    const onClose = (): void => ac.abort();
    this.once('close', onClose);
    signal?.addEventListener('abort', onClose, { once: true });
    try {
      for await (const [event] of on(this, 'event', { signal: ac.signal })) yield event as QmpEvent;
    } catch (err) {
      if (!ac.signal.aborted) throw err;
    } finally {
      this.off('close', onClose);
      signal?.removeEventListener('abort', onClose);
    }
  }

  /** Resolves with the first event named `name` (optionally matching `match`), or rejects on timeout/close. */
  waitEvent(name: string, timeoutMs: number, match?: (ev: QmpEvent) => boolean): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (ev: QmpEvent): void => {
        if (ev.event !== name || (match && !match(ev))) return;
        cleanup();
        resolve(ev);
      };
      const onClose = (): void => {
        cleanup();
        reject(new QmpError('E_QMP_CLOSED', `QMP connection closed while waiting for ${name}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new QmpError('E_QMP_TIMEOUT', `No ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      if (this.closed) return onClose();
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }
}
