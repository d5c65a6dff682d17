import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { clientProof, newNonce, proofMatches, readSecretFile, serverProof } from './auth.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-ms-auth-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

describe('challenge-response proofs', () => {
  const secret = Buffer.from('0123456789abcdef0123456789abcdef');
  const cn = newNonce();
  const sn = newNonce();

  it('match for the same secret and nonces only', () => {
    assert.ok(proofMatches(clientProof(secret, cn, sn), clientProof(Buffer.from(secret), cn, sn)));
    assert.ok(
      !proofMatches(
        clientProof(secret, cn, sn),
        clientProof(Buffer.from('another secret, 32 bytes long!!!'), cn, sn),
      ),
    );
    assert.ok(!proofMatches(clientProof(secret, cn, sn), clientProof(secret, cn, newNonce())));
    assert.ok(!proofMatches(clientProof(secret, cn, sn), Buffer.alloc(5)));
  });

  it('keeps the two directions apart (no reflection)', () => {
    assert.ok(!proofMatches(clientProof(secret, cn, sn), serverProof(secret, cn, sn)));
  });
});

describe('secret file', () => {
  it('reads an owner-only file and drops one trailing newline', () => {
    const f = path.join(dir, 'ok');
    fs.writeFileSync(f, 'a-secret-of-enough-length\n', { mode: 0o600 });
    assert.equal(readSecretFile(f).toString(), 'a-secret-of-enough-length');
  });

  it('refuses a group/world-readable, short, missing or non-regular secret file', () => {
    const open = path.join(dir, 'open');
    fs.writeFileSync(open, 'a-secret-of-enough-length\n');
    fs.chmodSync(open, 0o644);
    assert.throws(() => readSecretFile(open), /readable by group or others \(mode 0644\): chmod 600/);
    const short = path.join(dir, 'short');
    fs.writeFileSync(short, 'abc', { mode: 0o600 });
    assert.throws(() => readSecretFile(short), /holds 3 bytes; use at least 16/);
    assert.throws(() => readSecretFile(path.join(dir, 'absent')), /cannot read secret file/);
    assert.throws(() => readSecretFile(dir), /not a regular file/);
  });
});
