import { InterruptedError } from '../core/errors.js';

const SIGNALS: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

/**
 * Runs `work` with Ctrl-C, SIGTERM and SIGHUP turned into an abort: the work undoes what it
 * started (resumes the guest, puts settings back) and fails with an InterruptedError. Further
 * signals while it undoes are acknowledged but never abandon a paused guest.
 */
export async function interruptible<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  let warned = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (!controller.signal.aborted) {
      controller.abort(new InterruptedError(sig));
      return;
    }
    if (!warned) {
      warned = true;
      process.stderr.write('tlc: still undoing the checkpoint (the guest is resumed first); please wait\n');
    }
  };
  for (const sig of SIGNALS) process.on(sig, onSignal);
  try {
    return await work(controller.signal);
  } finally {
    for (const sig of SIGNALS) process.off(sig, onSignal);
  }
}
