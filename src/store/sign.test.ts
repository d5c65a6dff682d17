import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, beforeEach, describe, it } from 'node:test';
import { promisify } from 'node:util';

import { MANIFEST_FILE, type Manifest, sealManifest } from './manifest.js';
import { openManifest } from './schema.js';
import { checkSignature, defaultKeyFile, keyIdOf, loadSigningKey, signManifest } from './sign.js';
import { CheckpointStore } from './store.js';
import { fixtureManifest, writeFixtureCheckpoint } from './testing.js';
import { verifyCheckpoint } from './verify.js';

const KEY = Buffer.alloc(32, 7);
const OTHER_KEY = Buffer.alloc(32, 9);
const WHERE = '/store/x/manifest.json';

let tmp: string;
const savedEnv = { XDG_CONFIG_HOME: process.env.XDG_CONFIG_HOME, TLC_SIGN_KEY: process.env.TLC_SIGN_KEY };

before(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-sign-test-'));
});
after(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
  for (const [k, v] of Object.entries(savedEnv)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
});

function reopen(m: Manifest, key?: Buffer): Manifest {
  return openManifest(sealManifest(m, key), WHERE);
}

describe('signing key', () => {
  let n = 0;
  beforeEach(() => {
    process.env.XDG_CONFIG_HOME = path.join(tmp, `config-${++n}`);
    delete process.env.TLC_SIGN_KEY;
  });

  it('creates the per-user key on first use only when asked, private and stable', () => {
    assert.equal(loadSigningKey({ create: false }), undefined, 'no key, none created');
    assert.ok(!fs.existsSync(defaultKeyFile()));
    const first = loadSigningKey({ create: true });
    assert.ok(first?.created);
    assert.equal(first.file, path.join(process.env.XDG_CONFIG_HOME as string, 'tlc', 'sign.key'));
    assert.equal(first.key.length, 32);
    assert.equal(first.keyId, keyIdOf(first.key));
    assert.match(first.keyId, /^[0-9a-f]{16}$/);
    assert.match(fs.readFileSync(first.file, 'utf8'), /^[0-9a-f]{64}\n$/);
    assert.equal(fs.statSync(first.file).mode & 0o777, 0o600);
    assert.equal(fs.statSync(path.dirname(first.file)).mode & 0o777, 0o700);
    const again = loadSigningKey({ create: true });
    assert.equal(again?.created, false);
    assert.deepEqual(again?.key, first.key);
    assert.deepEqual(loadSigningKey({ create: false })?.key, first.key);
    assert.deepEqual(fs.readdirSync(path.dirname(first.file)), ['sign.key'], 'no temporary files left');
  });

  it('gives processes racing to create it one key', async () => {
    const sign = new URL('./sign.js', import.meta.url).href;
    const script = `import(${JSON.stringify(sign)}).then((s) => process.stdout.write(s.loadSigningKey({ create: true }).keyId))`;
    const run = promisify(execFile);
    const ids = await Promise.all(
      Array.from({ length: 8 }, () =>
        run(process.execPath, ['-e', script], { env: { ...process.env } }).then((r) => r.stdout),
      ),
    );
    assert.equal(new Set(ids).size, 1, `one key id: ${ids.join(' ')}`);
    assert.equal(ids[0], loadSigningKey({ create: false })?.keyId);
  });

  it('prefers --sign-key, then $TLC_SIGN_KEY, and never creates those', () => {
    const named = path.join(tmp, `named-${n}.key`);
    const fromEnv = path.join(tmp, `env-${n}.key`);
    fs.writeFileSync(named, KEY.toString('hex') + '\n', { mode: 0o600 });
    fs.writeFileSync(fromEnv, OTHER_KEY.toString('hex'), { mode: 0o600 });
    process.env.TLC_SIGN_KEY = fromEnv;
    assert.deepEqual(loadSigningKey({ keyFile: named, create: true })?.key, KEY);
    assert.deepEqual(loadSigningKey({ create: true })?.key, OTHER_KEY);
    assert.ok(!fs.existsSync(defaultKeyFile()), 'the per-user key is not created');
    process.env.TLC_SIGN_KEY = path.join(tmp, 'missing.key');
    assert.throws(() => loadSigningKey({ create: true }), {
      code: 'E_USAGE',
      message: /Cannot read signing key/,
    });
  });

  it('refuses a key file others can read, or one that holds no key', () => {
    const file = path.join(tmp, `bad-${n}.key`);
    fs.writeFileSync(file, KEY.toString('hex'), { mode: 0o600 });
    fs.chmodSync(file, 0o644);
    assert.throws(() => loadSigningKey({ keyFile: file, create: false }), {
      code: 'E_USAGE',
      message: /accessible by other users \(mode 644\): chmod 600/,
    });
    for (const content of ['', 'secret', 'ab'.repeat(31), 'g'.repeat(64)]) {
      fs.writeFileSync(file, content);
      fs.chmodSync(file, 0o600);
      assert.throws(() => loadSigningKey({ keyFile: file, create: false }), {
        code: 'E_USAGE',
        message: /must hold at least 32 bytes as hex/,
      });
    }
  });
});

describe('manifest signature', () => {
  it('is valid with the key it was signed with', () => {
    const m = reopen(fixtureManifest(), KEY);
    assert.deepEqual(m.signature, signManifest(fixtureManifest(), KEY));
    assert.equal(m.signature?.alg, 'hmac-sha256');
    assert.equal(m.signature?.keyId, keyIdOf(KEY));
    assert.equal(checkSignature(m, KEY), 'valid');
    assert.equal(checkSignature(m, undefined), 'no-key');
    assert.equal(checkSignature(reopen(fixtureManifest()), KEY), 'unsigned');
  });

  it('does not depend on key order or whitespace (canonical body)', () => {
    const text = sealManifest(fixtureManifest(), KEY);
    const reversed = (v: unknown): unknown =>
      v && typeof v === 'object' && !Array.isArray(v)
        ? Object.fromEntries(
            Object.entries(v)
              .reverse()
              .map(([k, x]) => [k, reversed(x)]),
          )
        : v;
    const m = reopen(reversed(JSON.parse(text)) as Manifest);
    assert.equal(checkSignature(m, KEY), 'valid');
  });

  it('refuses a tampered manifest resealed with SHA-256 but not re-signed', () => {
    const signed = reopen(fixtureManifest(), KEY);
    const tampered: Manifest[] = [
      { ...signed, vm: { ...signed.vm, extraArgs: ['-netdev', 'tap,script=/tmp/evil'] } },
      {
        ...signed,
        blocks: signed.blocks.map((b, i) => (i === 0 ? { ...b, sumsSha256: 'f'.repeat(64) } : b)),
      },
      { ...signed, device: { ...signed.device, sha256: '0'.repeat(64) } },
      { ...signed, configSha256: 'a'.repeat(64) },
      { ...signed, vmWasRunning: false },
    ];
    for (const t of tampered) {
      const m = reopen(t); // the checksum is fine: anyone can recompute it
      assert.throws(() => checkSignature(m, KEY), {
        code: 'E_CORRUPT',
        message: /signature does not match: the manifest or a checksum in it was changed after signing/,
      });
    }
  });

  it('covers the fields a newer minor version adds', () => {
    const future = { ...fixtureManifest(), formatVersion: [1, 99], futureField: 'a' } as unknown as Manifest;
    const m = reopen(future, KEY);
    assert.equal(checkSignature(m, KEY), 'valid');
    const changed = reopen({ ...m, futureField: 'b' } as unknown as Manifest);
    assert.throws(() => checkSignature(changed, KEY), { code: 'E_CORRUPT' });
  });

  it('refuses a signature made with another key, naming both key ids', () => {
    const m = reopen(fixtureManifest(), OTHER_KEY);
    assert.throws(() => checkSignature(m, KEY), {
      code: 'E_CORRUPT',
      message: new RegExp(
        `signed with another key \\(keyId ${keyIdOf(OTHER_KEY)}\\), not this one \\(keyId ${keyIdOf(KEY)}\\)`,
      ),
    });
    // Claiming our key id does not help without our key.
    const forged = reopen({ ...m, signature: { ...signManifest(m, OTHER_KEY), keyId: keyIdOf(KEY) } });
    assert.throws(() => checkSignature(forged, KEY), { code: 'E_CORRUPT', message: /does not match/ });
  });

  it('signs again with a key, replacing an earlier signature', () => {
    const m = reopen(reopen(fixtureManifest(), OTHER_KEY), KEY);
    assert.equal(checkSignature(m, KEY), 'valid');
  });
});

describe('verify and signatures', () => {
  let store: CheckpointStore;
  before(() => {
    store = new CheckpointStore(path.join(tmp, 'store'));
  });

  it('reports a valid signature; without a key, says it was not checked', () => {
    writeFixtureCheckpoint(store.dir, { vm: 'signed', key: KEY });
    const c = store.resolve('signed');
    const report = verifyCheckpoint(c, true, { key: KEY });
    assert.deepEqual(report.problems, []);
    assert.equal(report.signature, 'valid');
    assert.equal(report.keyId, keyIdOf(KEY));
    const noKey = verifyCheckpoint(c, true);
    assert.equal(noKey.ok, true);
    assert.equal(noKey.signature, 'no-key');
  });

  it('refuses an unsigned checkpoint when a key is given, unless allowed', () => {
    writeFixtureCheckpoint(store.dir, { vm: 'plain' });
    const c = store.resolve('plain');
    const refused = verifyCheckpoint(c, false, { key: KEY });
    assert.equal(refused.ok, false);
    assert.equal(refused.signature, 'unsigned');
    assert.match(refused.problems.join('\n'), /not signed, and a signing key is configured/);
    const allowed = verifyCheckpoint(c, false, { key: KEY, allowUnsigned: true });
    assert.equal(allowed.ok, true);
    assert.equal(allowed.signature, 'unsigned');
    assert.equal(verifyCheckpoint(c, false).ok, true, 'no key configured: unsigned is fine');
  });

  it('refuses a signed checkpoint whose manifest was edited and resealed, or signed with another key', () => {
    const m = writeFixtureCheckpoint(store.dir, { vm: 'edited', key: KEY });
    const file = path.join(store.dir, m.id, MANIFEST_FILE);
    const opened = openManifest(fs.readFileSync(file, 'utf8'), file);
    fs.writeFileSync(file, sealManifest({ ...opened, vm: { ...opened.vm, append: 'init=/bin/sh' } }));
    const report = verifyCheckpoint(store.resolve('edited'), true, { key: KEY });
    assert.equal(report.ok, false);
    assert.equal(report.signature, 'invalid');
    assert.match(report.problems[0] ?? '', /signature does not match/);

    writeFixtureCheckpoint(store.dir, { vm: 'foreign', key: OTHER_KEY });
    const foreign = verifyCheckpoint(store.resolve('foreign'), true, { key: KEY, allowUnsigned: true });
    assert.equal(foreign.signature, 'invalid');
    assert.match(foreign.problems[0] ?? '', /signed with another key/);
  });
});
