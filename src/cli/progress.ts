import type { CheckpointProgress } from '../checkpoint/take.js';
import { formatBytes, formatMs } from './output.js';

const REDRAW_MS = 200;

/**
 * One status line on stderr, redrawn at a fixed interval when stderr is a terminal; silent
 * otherwise (stage lines still print, so logs stay readable).
 */
export class ProgressLine {
  private latest: CheckpointProgress | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly tty = process.stderr.isTTY === true;

  update = (p: CheckpointProgress): void => {
    this.latest = p;
    if (this.tty && !this.timer) this.timer = setInterval(() => this.draw(), REDRAW_MS);
  };

  /** Prints a permanent line above the status line. */
  line = (text: string): void => {
    if (this.tty) process.stderr.write('\r\x1b[K');
    process.stderr.write(text + '\n');
    if (this.tty) this.draw();
  };

  private draw(): void {
    const p = this.latest;
    if (!p) return;
    const parts = [
      p.stage.padEnd(10),
      formatBytes(p.bytesReceived).padStart(10),
      `pass ${p.passes}`,
      p.dirtyPagesRate !== undefined ? `dirty ${p.dirtyPagesRate} pages/s` : '',
      p.throttlePct ? `throttle ${p.throttlePct}%` : '',
      formatMs(p.elapsedMs),
    ].filter(Boolean);
    process.stderr.write(`\r\x1b[K${parts.join('  ')}`);
  }

  done(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    if (this.tty && this.latest) process.stderr.write('\r\x1b[K');
  }
}
