import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { after, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { newNonce, serverProof } from './auth.js';
import { MemoryServerClient } from './client.js';
import { FRAME, FrameDecoder, frameParts, jsonPayload, type FrameType } from './protocol.js';

const secret = randomBytes(32);
const listeners: net.Server[] = [];
after(() => {
  for (const l of listeners) l.close();
});

interface FakeOptions {
  /** Delay before answering request number n (0-based). */
  delayMs?: (n: number) => number;
  /** Prove with this secret instead of the real one (an impostor). */
  proveWith?: Buffer;
  /** Accept the connection and never answer. */
  silent?: boolean;
}

/** A stand-in server speaking just enough of the protocol to exercise the client. */
async function fakeServer(opts: FakeOptions = {}): Promise<{ url: string; maxOutstanding: () => number }> {
  let outstanding = 0;
  let max = 0;
  let n = 0;
  const server = net.createServer((socket) => {
    socket.on('error', () => {});
    if (opts.silent) return;
    let clientNonce = Buffer.alloc(0);
    const serverNonce = newNonce();
    const send = (type: FrameType, id: number, payload: Buffer): void => {
      if (!socket.destroyed) for (const p of frameParts(type, id, [payload])) socket.write(p);
    };
    const decoder = new FrameDecoder((type, id, payload) => {
      if (type === FRAME.HELLO) {
        clientNonce = Buffer.from(payload);
        send(FRAME.CHALLENGE, 0, serverNonce);
      } else if (type === FRAME.AUTH) {
        send(FRAME.WELCOME, 0, serverProof(opts.proveWith ?? secret, clientNonce, serverNonce));
      } else {
        outstanding++;
        max = Math.max(max, outstanding);
        const delay = opts.delayMs?.(n++) ?? 0;
        setTimeout(() => {
          outstanding--;
          send(FRAME.OK, id, jsonPayload({ checkpoints: [] }));
        }, delay);
      }
    });
    socket.on('data', (c: Buffer) => decoder.push(c));
  });
  listeners.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return { url: `tcp://127.0.0.1:${port}`, maxOutstanding: () => max };
}

describe('memory-server client', () => {
  it('keeps at most maxInFlight requests outstanding and answers each by its id', async () => {
    const fake = await fakeServer({ delayMs: (n) => (n % 3) * 10 });
    const c = await MemoryServerClient.connect(fake.url, { secret, maxInFlight: 4 });
    const all = await Promise.all(Array.from({ length: 24 }, () => c.list()));
    assert.equal(all.length, 24);
    assert.ok(fake.maxOutstanding() <= 4, `saw ${fake.maxOutstanding()} outstanding`);
    assert.ok(fake.maxOutstanding() >= 2, 'requests were pipelined');
    c.close();
  });

  it('times a request out, ignores its late answer, and stays usable', async () => {
    const fake = await fakeServer({ delayMs: (n) => (n === 0 ? 300 : 0) });
    const c = await MemoryServerClient.connect(fake.url, { secret, requestTimeoutMs: 100 });
    await assert.rejects(c.list(), (err: unknown) => {
      assert.equal((err as { code?: string }).code, 'E_MS_TIMEOUT');
      assert.match((err as Error).message, /did not answer list within 100 ms/);
      return true;
    });
    await sleep(300); // the late answer arrives meanwhile
    assert.deepEqual(await c.list(), []);
    assert.ok(!c.closed);
    c.close();
    await assert.rejects(c.list(), /closed by us \(list not sent\)/);
  });

  it('refuses a server that cannot prove it holds the secret', async () => {
    const fake = await fakeServer({ proveWith: randomBytes(32) });
    await assert.rejects(MemoryServerClient.connect(fake.url, { secret }), (err: unknown) => {
      assert.equal((err as { code?: string }).code, 'E_MS_AUTH');
      assert.match((err as Error).message, /failed to prove it holds the shared secret/);
      return true;
    });
  });

  it('fails clearly on a refused connection and on a server that never answers', async () => {
    const closed = net.createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
    const port = (closed.address() as net.AddressInfo).port;
    await new Promise<void>((r) => closed.close(() => r()));
    await assert.rejects(
      MemoryServerClient.connect(`tcp://127.0.0.1:${port}`, { secret }),
      /cannot connect to memory server 127\.0\.0\.1:\d+: ECONNREFUSED/,
    );
    const silent = await fakeServer({ silent: true });
    await assert.rejects(
      MemoryServerClient.connect(silent.url, { secret, connectTimeoutMs: 200 }),
      /did not complete the handshake within 200 ms/,
    );
  });
});
