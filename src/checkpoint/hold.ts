/**
 * Fault-injection points for crash tests: with `TLC_TEST_HOLD_AT=<point>`, tlc announces the point
 * on stderr (`tlc-test: holding at <point>`) and waits there until it is interrupted or killed,
 * so a test can kill it at a chosen moment rather than after a guessed delay. Without the
 * variable a hold point costs one environment lookup.
 */
export type HoldPoint = 'streaming' | 'stopped' | 'stream-complete' | 'disk-copy' | 'persist' | 'publish';

export const HOLD_ENV = 'TLC_TEST_HOLD_AT';

export function holdsAt(point: HoldPoint): boolean {
  return process.env[HOLD_ENV] === point;
}

export function holdAt(point: HoldPoint, signal?: AbortSignal): Promise<void> {
  if (process.env[HOLD_ENV] !== point) return Promise.resolve();
  process.stderr.write(`tlc-test: holding at ${point}\n`);
  return new Promise((_resolve, reject) => {
    // An unresolved promise alone would let Node exit; the timer keeps the process waiting.
    const keepAlive = setInterval(() => undefined, 60_000);
    signal?.addEventListener(
      'abort',
      () => {
        clearInterval(keepAlive);
        reject(signal.reason as Error);
      },
      { once: true },
    );
  });
}
