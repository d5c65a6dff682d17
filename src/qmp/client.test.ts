/**
 * The QMP client against a deliberately bad peer: a unix-socket server in the test that greets
 * late or never, sends garbage, floods one endless line, hangs up mid-call or never answers.
 * Every case must end in a typed error within its bound; none may hang or crash the process.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { QmpError, type QmpErrorCode } from '../core/errors.js';
import { QmpClient } from './client.js';

const GREETING = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\n';
const FAST_MS = 300;
/** How much later than its own timeout a failure may arrive before the test calls it a hang. */
const SLACK_MS = 2000;

interface Peer {
  path: string;
  /** Requests the client sent, one parsed JSON object each. */
  requests: { execute: string; id: number }[];
  close(): Promise<void>;
}

let dir: string;
let serial = 0;

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-qmp-test-'));
});

after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/**
 * A fake QMP server. `onConnect` runs for the accepted socket; `onRequest` for each request line
 * the client sends (default: answer qmp_capabilities, ignore the rest).
 */
async function peer(
  onConnect: (s: net.Socket) => void,
  onRequest: (s: net.Socket, req: { execute: string; id: number }) => void = answerCapabilities,
): Promise<Peer> {
  const sockPath = path.join(dir, `peer-${serial++}.sock`);
  const requests: Peer['requests'] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined);
    let buf = '';
    s.on('data', (chunk) => {
      buf += chunk.toString('utf8');
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const req = JSON.parse(buf.slice(0, nl)) as { execute: string; id: number };
        buf = buf.slice(nl + 1);
        requests.push(req);
        onRequest(s, req);
      }
    });
    onConnect(s);
  });
  await new Promise<void>((resolve) => server.listen(sockPath, resolve));
  return {
    path: sockPath,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

function answerCapabilities(s: net.Socket, req: { execute: string; id: number }): void {
  if (req.execute === 'qmp_capabilities') s.write(JSON.stringify({ return: {}, id: req.id }) + '\n');
}

/** Awaits `p`, which must reject with a QmpError of `code` within `withinMs`. */
async function rejectsWith(p: Promise<unknown>, code: QmpErrorCode, withinMs: number): Promise<QmpError> {
  const started = performance.now();
  let hang: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    hang = setTimeout(() => reject(new Error(`no settlement within ${withinMs} ms (hang)`)), withinMs);
  });
  try {
    await Promise.race([p, timeout]);
  } catch (err) {
    assert.ok(err instanceof QmpError, `expected a QmpError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.ok(performance.now() - started <= withinMs);
    return err;
  } finally {
    clearTimeout(hang);
  }
  assert.fail(`resolved, expected ${code}`);
}

describe('QMP client against a bad peer', () => {
  it('a peer that never greets: E_QMP_GREETING within the timeout', async () => {
    const p = await peer(() => undefined);
    try {
      const err = await rejectsWith(
        QmpClient.connect(p.path, { timeoutMs: FAST_MS }),
        'E_QMP_GREETING',
        FAST_MS + SLACK_MS,
      );
      assert.match(err.message, /greet/);
    } finally {
      await p.close();
    }
  });

  it('a peer that hangs up before greeting: E_QMP_GREETING at once', async () => {
    const p = await peer((s) => s.end());
    try {
      await rejectsWith(QmpClient.connect(p.path, { timeoutMs: 10_000 }), 'E_QMP_GREETING', SLACK_MS);
    } finally {
      await p.close();
    }
  });

  it('no socket at all: E_QMP_CONNECT', async () => {
    await rejectsWith(
      QmpClient.connect(path.join(dir, 'absent.sock'), { timeoutMs: 10_000 }),
      'E_QMP_CONNECT',
      SLACK_MS,
    );
  });

  it('garbage instead of a greeting: E_QMP_GREETING', async () => {
    for (const garbage of [
      'HTTP/1.1 400 Bad Request\r\n\r\n',
      '\x00\xff{{{\n',
      'null\n',
      '[1,2]\n',
      '{"x":1}\n',
    ]) {
      const p = await peer((s) => s.write(garbage));
      try {
        await rejectsWith(QmpClient.connect(p.path, { timeoutMs: 10_000 }), 'E_QMP_GREETING', SLACK_MS);
      } finally {
        await p.close();
      }
    }
  });

  it('garbage instead of the capabilities reply: E_QMP_NEGOTIATE', async () => {
    const p = await peer(
      (s) => s.write(GREETING),
      (s) => s.write('this is not json\n'),
    );
    try {
      await rejectsWith(QmpClient.connect(p.path, { timeoutMs: 10_000 }), 'E_QMP_NEGOTIATE', SLACK_MS);
    } finally {
      await p.close();
    }
  });

  it('garbage instead of a reply: the pending call fails at once, the client is closed', async () => {
    for (const garbage of ['not json at all', 'null', '42', '"a string"', '[]']) {
      const p = await peer(
        (s) => s.write(GREETING),
        (s, req) => {
          if (req.execute === 'qmp_capabilities') answerCapabilities(s, req);
          else s.write(garbage + '\n');
        },
      );
      const qmp = await QmpClient.connect(p.path, { timeoutMs: 10_000 });
      try {
        const err = await rejectsWith(
          qmp.execute('query-status', undefined, { timeoutMs: 10_000 }),
          'E_QMP_CLOSED',
          SLACK_MS,
        );
        assert.match(err.message, /not a QMP message/, garbage);
        assert.equal(qmp.closed, true);
        // Later calls fail at once with the same code.
        await rejectsWith(qmp.execute('query-status'), 'E_QMP_CLOSED', SLACK_MS);
      } finally {
        qmp.close();
        await p.close();
      }
    }
  });

  it('a malformed error reply fails only its call, with E_QMP_EXECUTE', async () => {
    const replies = ['{"error": null, "id": ID}', '{"error": {"class": 5, "desc": []}, "id": ID}'];
    const p = await peer(
      (s) => s.write(GREETING),
      (s, req) => {
        if (req.execute === 'qmp_capabilities') return answerCapabilities(s, req);
        s.write((replies.shift() ?? '{"return": {}, "id": ID}').replace('ID', String(req.id)) + '\n');
      },
    );
    const qmp = await QmpClient.connect(p.path, { timeoutMs: 10_000 });
    try {
      const first = await rejectsWith(qmp.execute('query-status'), 'E_QMP_EXECUTE', SLACK_MS);
      assert.equal(first.qmpClass, undefined);
      await rejectsWith(qmp.execute('query-status'), 'E_QMP_EXECUTE', SLACK_MS);
      assert.deepEqual(await qmp.execute('query-migrate'), {});
    } finally {
      qmp.close();
      await p.close();
    }
  });

  it('events and unrelated replies in between do not disturb a call', async () => {
    const p = await peer(
      (s) => s.write(GREETING),
      (s, req) => {
        if (req.execute === 'qmp_capabilities') return answerCapabilities(s, req);
        s.write('{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\r\n');
        s.write(JSON.stringify({ return: { stale: true }, id: 9999 }) + '\n');
        // The reply split across writes, with a multi-byte character cut in half.
        const reply = Buffer.from(
          JSON.stringify({ return: { status: 'pausé', running: false }, id: req.id }) + '\n',
        );
        const cut = reply.indexOf(Buffer.from('é')) + 1;
        s.write(reply.subarray(0, cut));
        setTimeout(() => s.write(reply.subarray(cut)), 20);
      },
    );
    const qmp = await QmpClient.connect(p.path, { timeoutMs: 10_000 });
    try {
      const stop = qmp.waitEvent('STOP', 5000);
      const status = await qmp.execute('query-status');
      assert.deepEqual(status, { status: 'pausé', running: false });
      assert.equal((await stop).event, 'STOP');
    } finally {
      qmp.close();
      await p.close();
    }
  });

  it('an endless greeting line: E_QMP_GREETING once the line limit is passed, without buffering on', async () => {
    let sent = 0;
    const p = await peer((s) => {
      const block = Buffer.alloc(1024 * 1024, 'x');
      const pump = (): void => {
        // Stop after 64 MiB: well past the 16 MiB limit; the client must have hung up by then.
        while (!s.destroyed && sent < 64 * 1024 * 1024) {
          sent += block.length;
          if (!s.write(block)) return void s.once('drain', pump);
        }
      };
      pump();
    });
    try {
      const err = await rejectsWith(
        QmpClient.connect(p.path, { timeoutMs: 30_000 }),
        'E_QMP_GREETING',
        20_000,
      );
      assert.match(err.message, /a line longer than 16777216 bytes/);
      assert.ok(sent < 64 * 1024 * 1024, `the client read ${sent} bytes of one line`);
    } finally {
      await p.close();
    }
  });

  it('an endless reply line: the pending call fails with the line limit as reason', async () => {
    let sent = 0;
    const p = await peer(
      (s) => s.write(GREETING),
      (s, req) => {
        if (req.execute === 'qmp_capabilities') return answerCapabilities(s, req);
        const block = Buffer.alloc(1024 * 1024, ' ');
        s.write('{"return": "');
        const pump = (): void => {
          while (!s.destroyed && sent < 64 * 1024 * 1024) {
            sent += block.length;
            if (!s.write(block)) return void s.once('drain', pump);
          }
        };
        pump();
      },
    );
    const qmp = await QmpClient.connect(p.path, { timeoutMs: 10_000 });
    try {
      const err = await rejectsWith(
        qmp.execute('query-status', undefined, { timeoutMs: 30_000 }),
        'E_QMP_CLOSED',
        20_000,
      );
      assert.match(err.message, /a line longer than 16777216 bytes/);
      assert.ok(sent < 64 * 1024 * 1024, `the client read ${sent} bytes of one line`);
      assert.equal(qmp.closed, true);
    } finally {
      qmp.close();
      await p.close();
    }
  });

  it('a peer that hangs up mid-call: every pending call rejects with E_QMP_CLOSED', async () => {
    const p = await peer(
      (s) => s.write(GREETING),
      (s, req) => {
        if (req.execute === 'qmp_capabilities') return answerCapabilities(s, req);
        // Hang up once both calls are in flight.
        if (req.execute === 'query-migrate') s.destroy();
      },
    );
    const qmp = await QmpClient.connect(p.path, { timeoutMs: 10_000 });
    const closed = new Promise<void>((resolve) => qmp.once('close', resolve));
    try {
      const calls = [
        qmp.execute('query-status', undefined, { timeoutMs: 10_000 }),
        qmp.execute('query-migrate', undefined, { timeoutMs: 10_000 }),
      ];
      for (const call of calls) await rejectsWith(call, 'E_QMP_CLOSED', SLACK_MS);
      await closed;
      assert.equal(qmp.closed, true);
      await rejectsWith(qmp.execute('query-status'), 'E_QMP_CLOSED', SLACK_MS);
      await rejectsWith(qmp.waitEvent('STOP', 10_000), 'E_QMP_CLOSED', SLACK_MS);
    } finally {
      qmp.close();
      await p.close();
    }
  });

  it('a peer that never answers a command: E_QMP_TIMEOUT, and the client stays usable', async () => {
    const p = await peer(
      (s) => s.write(GREETING),
      (s, req) => {
        if (req.execute === 'qmp_capabilities') return answerCapabilities(s, req);
        if (req.execute === 'query-migrate') s.write(JSON.stringify({ return: {}, id: req.id }) + '\n');
        // query-status: never answered
      },
    );
    const qmp = await QmpClient.connect(p.path, { timeoutMs: 10_000 });
    try {
      await rejectsWith(
        qmp.execute('query-status', undefined, { timeoutMs: FAST_MS }),
        'E_QMP_TIMEOUT',
        FAST_MS + SLACK_MS,
      );
      assert.equal(qmp.closed, false);
      assert.deepEqual(await qmp.execute('query-migrate'), {});
    } finally {
      qmp.close();
      await p.close();
    }
  });

  it('a peer that greets but never negotiates: E_QMP_TIMEOUT within the connect bound', async () => {
    const p = await peer(
      (s) => s.write(GREETING),
      () => undefined,
    );
    try {
      await rejectsWith(
        QmpClient.connect(p.path, { timeoutMs: FAST_MS }),
        'E_QMP_TIMEOUT',
        FAST_MS + SLACK_MS,
      );
    } finally {
      await p.close();
    }
  });
});
