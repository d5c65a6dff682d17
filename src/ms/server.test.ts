import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryServerClient } from './client.js';
import { RemoteError } from './errors.js';
import { clientProof, newNonce } from './auth.js';
import { FRAME, FrameDecoder, encodeExtentHead, frameParts, type FrameType } from './protocol.js';
import { MemoryServer, type MemoryServerOptions } from './server.js';

const base = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-ms-server-'));
const secret = randomBytes(32);
const servers: MemoryServer[] = [];
after(async () => {
  for (const s of servers) await s.close();
  fs.rmSync(base, { recursive: true, force: true });
});

async function start(
  name: string,
  opts: Partial<MemoryServerOptions> = {},
): Promise<{ server: MemoryServer; logs: string[] }> {
  const logs: string[] = [];
  const server = await MemoryServer.start({
    listen: { kind: 'tcp', host: '127.0.0.1', port: 0 },
    dataDir: path.join(base, name),
    secret,
    log: (line) => logs.push(line),
    ...opts,
  });
  servers.push(server);
  return { server, logs };
}

/** A raw socket that collects decoded frames, for peers that misbehave on purpose. */
async function rawPeer(
  server: MemoryServer,
): Promise<{ socket: net.Socket; frames: Array<{ type: number; body: string }>; closed: Promise<void> }> {
  const port = server.address.kind === 'tcp' ? server.address.port : 0;
  const socket = net.connect({ host: '127.0.0.1', port });
  await new Promise((r) => socket.once('connect', r));
  const frames: Array<{ type: number; body: string }> = [];
  const decoder = new FrameDecoder((type, _id, payload) => frames.push({ type, body: payload.toString() }));
  socket.on('data', (c: Buffer) => decoder.push(c));
  socket.on('error', () => {});
  const closed = new Promise<void>((r) => socket.once('close', () => r()));
  return { socket, frames, closed };
}

describe('memory server (in process)', () => {
  it('authenticates a client with the secret and refuses one without, saying why on both sides', async () => {
    const { server, logs } = await start('auth');
    const good = await MemoryServerClient.connect(server.url, { secret });
    assert.deepEqual(await good.list(), []);
    good.close();
    await assert.rejects(
      MemoryServerClient.connect(server.url, { secret: randomBytes(32) }),
      (err: unknown) => {
        assert.ok(err instanceof RemoteError);
        assert.equal(err.code, 'E_MS_AUTH');
        assert.equal(err.remote, 'auth');
        assert.match(err.message, /^memory server 127\.0\.0\.1:\d+ refused us: wrong secret$/);
        return true;
      },
    );
    await assert.rejects(
      MemoryServerClient.connect(server.url, { secret, protocolVersion: 2 }),
      /refused us: unsupported protocol version 2 \(this server speaks version 1\)/,
    );
    assert.ok(
      logs.some((l) => /^127\.0\.0\.1:\d+: refused: wrong secret$/.test(l)),
      logs.join('\n'),
    );
    assert.ok(logs.some((l) => /refused: unsupported protocol version 2/.test(l)));
  });

  it('keeps the newest version of a re-sent extent and refuses an incomplete commit', async () => {
    const { server } = await start('overwrite');
    const c = await MemoryServerClient.connect(server.url, { secret });
    await c.begin('c1');
    const old = randomBytes(1 << 20);
    const newest = randomBytes(1 << 20);
    // Pipelined: the second put may reach the writer while the first is still queued or running.
    await Promise.all([
      c.putExtent({ ckpt: 'c1', block: 'pc.ram', index: 0, offset: 0, data: old }),
      c.putExtent({ ckpt: 'c1', block: 'pc.ram', index: 0, offset: 0, data: randomBytes(1 << 20) }),
      c.putExtent({ ckpt: 'c1', block: 'pc.ram', index: 0, offset: 0, data: newest }),
    ]);
    await assert.rejects(
      c.commit('c1', { extents: { 'pc.ram': [0, 1, 2] }, blobs: ['manifest'] }),
      (err: unknown) =>
        err instanceof RemoteError &&
        err.remote === 'incomplete' &&
        /lacks 2 extent\(s\) \(1, 2\).*manifest missing/.test(err.message),
    );
    assert.deepEqual(await c.list(), [], 'a refused commit lists nothing');
    await c.putBlob('c1', 'manifest', Buffer.from('{}'));
    await c.putExtent({ ckpt: 'c1', block: 'pc.ram', index: 1, offset: 1 << 20, data: old });
    await c.putExtent({ ckpt: 'c1', block: 'pc.ram', index: 2, offset: 2 << 20, data: old });
    await c.commit('c1', { extents: { 'pc.ram': [0, 1, 2] }, blobs: ['manifest'] });
    assert.ok((await c.getExtent('c1', 'pc.ram', 0)).data.equals(newest));
    await assert.rejects(c.begin('c1'), /already committed/);
    await assert.rejects(
      c.putExtent({ ckpt: 'c1', block: 'pc.ram', index: 3, offset: 0, data: old }),
      /was not begun/,
    );
    c.close();
  });

  it('patches pages of an extent (pre-copy re-sends), buffered or already on disk, and recomputes its checksum', async () => {
    const { server } = await start('pages');
    const c = await MemoryServerClient.connect(server.url, { secret });
    await c.begin('p1');
    const expected = [randomBytes(1 << 20), randomBytes(1 << 20)];
    const patch = (k: number, at: number, len: number): { at: number; data: Buffer } => {
      const data = randomBytes(len);
      data.copy(expected[k] as Buffer, at);
      return { at, data };
    };
    // Extent 0: pages sent right behind the extent (probably still buffered when they arrive).
    const first = Buffer.from(expected[0] as Buffer);
    const runs0 = [patch(0, 0, 4096), patch(0, 65536, 8192)];
    await Promise.all([
      c.putExtent({ ckpt: 'p1', block: 'pc.ram', index: 0, offset: 0, data: first }),
      c.putPages({ ckpt: 'p1', block: 'pc.ram', index: 0, runs: runs0 }),
    ]);
    // Extent 1: written and fsynced first, then patched twice on disk.
    await c.putExtent({
      ckpt: 'p1',
      block: 'pc.ram',
      index: 1,
      offset: 1 << 20,
      data: Buffer.from(expected[1] as Buffer),
    });
    await c.flush('p1');
    await c.putPages({ ckpt: 'p1', block: 'pc.ram', index: 1, runs: [patch(1, 4096, 4096)] });
    await c.putPages({
      ckpt: 'p1',
      block: 'pc.ram',
      index: 1,
      runs: [patch(1, (1 << 20) - 4096, 4096), patch(1, 0, 10)],
    });
    await c.commit('p1', { extents: { 'pc.ram': [0, 1] } });
    for (const k of [0, 1]) {
      const got = await c.getExtent('p1', 'pc.ram', k); // the client verifies the recomputed checksum
      assert.ok(got.data.equals(expected[k] as Buffer), `extent ${k}`);
    }
    // Pages for an extent never sent, or beyond its end, fail the checkpoint at flush.
    await c.begin('p2');
    await c.putExtent({ ckpt: 'p2', block: 'pc.ram', index: 0, offset: 0, data: randomBytes(4096) });
    await c.flush('p2');
    await c.putPages({ ckpt: 'p2', block: 'pc.ram', index: 9, runs: [{ at: 0, data: randomBytes(10) }] });
    await assert.rejects(c.flush('p2'), /never sent whole/);
    await c.putPages({ ckpt: 'p2', block: 'pc.ram', index: 0, runs: [{ at: 4000, data: randomBytes(200) }] });
    await assert.rejects(c.flush('p2'), /beyond the extent's 4096 bytes/);
    await assert.rejects(
      c.putPages({ ckpt: 'p2', block: 'other', index: 0, runs: [{ at: 0, data: randomBytes(1) }] }),
      /no extent was sent/,
    );
    c.close();
  });

  it('answers garbage with an ERROR frame and disconnects that peer only', async () => {
    const { server, logs } = await start('garbage');
    const c = await MemoryServerClient.connect(server.url, { secret });
    const peer = await rawPeer(server);
    peer.socket.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    await peer.closed;
    assert.equal(peer.frames[0]?.type, FRAME.ERROR);
    assert.match(peer.frames[0]?.body ?? '', /"code":"protocol".*not a tlc memory-server frame/);
    assert.ok(logs.some((l) => /refused: malformed input/.test(l)));
    // An unauthenticated peer cannot send requests, nor make the server buffer a large frame.
    const early = await rawPeer(server);
    for (const p of frameParts(FRAME.LIST, 1, [Buffer.from('{}')])) early.socket.write(p);
    await early.closed;
    assert.match(early.frames[0]?.body ?? '', /expected HELLO, got LIST/);
    assert.deepEqual(await c.list(), []);
    c.close();
  });

  it('disconnects a peer that stalls in the handshake after the idle timeout', async () => {
    const { server, logs } = await start('idle', { idleTimeoutMs: 200 });
    const peer = await rawPeer(server);
    const started = Date.now();
    await peer.closed;
    assert.ok(Date.now() - started < 2000);
    assert.match(peer.frames[0]?.body ?? '', /"code":"timeout".*stalled in the handshake for 200 ms/);
    assert.ok(logs.some((l) => /stalled in the handshake/.test(l)));
  });

  it('keeps an idle client connection alive with pings', async () => {
    const { server } = await start('keepalive', { idleTimeoutMs: 1000 });
    const c = await MemoryServerClient.connect(server.url, { secret, keepAliveMs: 100 });
    await sleep(2500);
    assert.ok(!c.closed);
    assert.deepEqual(await c.list(), []);
    c.close();
  });

  it('stops reading a connection whose data outruns its budget, and still takes it all', async () => {
    const { server } = await start('budget', { connectionBudget: 8 * 1024 * 1024 });
    const c = await MemoryServerClient.connect(server.url, { secret, maxInFlight: 32 });
    await c.begin('big');
    const extents = Array.from({ length: 24 }, () => randomBytes(2 << 20));
    await Promise.all(
      extents.map((data, index) =>
        c.putExtent({ ckpt: 'big', block: 'pc.ram', index, offset: index * (2 << 20), data }),
      ),
    );
    assert.ok(server.pauses > 0, 'the connection was paused at least once');
    const flushed = await c.flush('big');
    assert.equal(flushed.extents, 24);
    await c.commit('big');
    for (const k of [0, 11, 23])
      assert.ok((await c.getExtent('big', 'pc.ram', k)).data.equals(extents[k] as Buffer));
    c.close();
  });

  it('refuses a second server on the same data directory, before discarding anything', async () => {
    const { server } = await start('locked');
    const c = await MemoryServerClient.connect(server.url, { secret });
    await c.begin('in-progress');
    await assert.rejects(start('locked'), /data directory .* is in use by another memory server \(pid \d+\)/);
    assert.ok(fs.existsSync(path.join(base, 'locked', 'pending', 'in-progress')));
    c.close();
  });

  it('survives random requests from an authenticated peer and keeps serving', async () => {
    const { server } = await start('fuzz');
    const port = server.address.kind === 'tcp' ? server.address.port : 0;
    const socket = net.connect({ host: '127.0.0.1', port });
    socket.on('error', () => {});
    const frames: Array<{ type: number; id: number; payload: Buffer }> = [];
    const decoder = new FrameDecoder((type, id, payload) => frames.push({ type, id, payload }));
    socket.on('data', (c: Buffer) => decoder.push(c));
    const closed = new Promise<void>((r) => socket.once('close', () => r()));
    const waitFrames = async (n: number): Promise<void> => {
      for (let i = 0; i < 200 && frames.length < n; i++) await sleep(10);
    };
    const send = (type: FrameType, id: number, payload: Buffer): void => {
      for (const p of frameParts(type, id, [payload])) socket.write(p);
    };
    await new Promise((r) => socket.once('connect', r));
    const cn = newNonce();
    send(FRAME.HELLO, 0, cn);
    await waitFrames(1);
    send(FRAME.AUTH, 0, clientProof(secret, cn, frames[0]?.payload as Buffer));
    await waitFrames(2);
    assert.equal(frames[1]?.type, FRAME.WELCOME);

    const requests: FrameType[] = [
      FRAME.BEGIN,
      FRAME.PUT_EXTENT,
      FRAME.PUT_PAGES,
      FRAME.PUT_BLOB,
      FRAME.FLUSH,
      FRAME.PREPARE,
      FRAME.COMMIT,
      FRAME.LIST,
      FRAME.PING,
      FRAME.INDEX,
      FRAME.GET_EXTENT,
      FRAME.GET_BLOB,
      FRAME.REMOVE,
      FRAME.OK,
      FRAME.EXTENT,
    ];
    const json = [
      '{}',
      'null',
      '[]',
      '{"ckpt":"../x"}',
      '{"ckpt":"a","expect":{"extents":{"x":[-1]}}}',
      '{"ckpt":"a","block":"/../../x","index":1e20}',
      '{"ckpt":"a","name":".."}',
      '{"ckpt":1}',
      'not json',
    ];
    let id = 1;
    const deadline = Date.now() + 700;
    while (Date.now() < deadline) {
      for (const type of requests) {
        const r = Math.random();
        const payload =
          r < 0.4
            ? Buffer.from(json[id % json.length] as string)
            : r < 0.7
              ? Buffer.concat([
                  encodeExtentHead({
                    ckpt: id % 2 ? 'a' : '..',
                    block: 'b/../c',
                    index: id,
                    offset: 0,
                    sha256: randomBytes(32),
                  }),
                  randomBytes(id % 64),
                ])
              : randomBytes(id % 300);
        send(type, id++, payload);
      }
      await sleep(1);
    }
    await waitFrames(id + 1);
    // Every request got an answer (almost all refusals), and nothing escaped the data directory.
    assert.equal(frames.length, id + 1, 'one answer per request');
    assert.ok(frames.slice(2).every((f) => f.type === FRAME.ERROR || f.type === FRAME.OK));
    assert.deepEqual(
      fs.readdirSync(base).filter((f) => /^[xc]$/.test(f)),
      [],
    );
    socket.destroy();
    await closed;
    const c = await MemoryServerClient.connect(server.url, { secret });
    assert.ok(Array.isArray(await c.list()));
    c.close();
  });

  it('listens on a unix socket too, and removes it when stopped', async () => {
    const sock = path.join(base, 'ms.sock');
    const { server } = await start('unix', { listen: { kind: 'unix', path: sock } });
    assert.equal(server.url, `unix:${sock}`);
    const c = await MemoryServerClient.connect(`unix:${sock}`, { secret });
    assert.deepEqual(await c.list(), []);
    c.close();
    await server.close();
    assert.ok(!fs.existsSync(sock));
  });

  it('on shutdown finishes requests in progress, then tells the client why it closes', async () => {
    const { server } = await start('gone');
    const c = await MemoryServerClient.connect(server.url, { secret });
    await c.begin('x');
    await c.putExtent({ ckpt: 'x', block: 'pc.ram', index: 0, offset: 0, data: randomBytes(1 << 20) });
    const flushing = c.flush('x');
    await sleep(5);
    await server.close();
    assert.equal((await flushing).extents, 1, 'the flush in progress completed');
    await sleep(50);
    await assert.rejects(c.list(), /dropped the connection: the memory server is stopping/);
  });
});
