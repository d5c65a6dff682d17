/**
 * Peer authentication: mutual challenge-response with HMAC-SHA256 over a shared secret.
 *
 *   client → HELLO(client nonce)        header carries the client's protocol version
 *   server → CHALLENGE(server nonce)    or ERROR "version" if it does not speak that version
 *   client → AUTH(client proof)         HMAC(secret, "tlc-ms client" | client nonce | server nonce)
 *   server → WELCOME(server proof)      HMAC(secret, "tlc-ms server" | client nonce | server nonce)
 *                                       or ERROR "auth" (wrong secret), then the server closes
 *
 * The client proves itself first, so a client with the wrong secret hears "wrong secret" from the
 * server instead of merely distrusting it; it then checks the server's proof, so a client never
 * sends guest memory to a host that does not hold the secret. Both nonces are fresh per connection
 * (crypto.randomBytes), so a recorded exchange cannot be replayed; the two labels keep one side's
 * proof from being reflected back as the other's. Proofs are compared with timingSafeEqual.
 *
 * Why not TLS: the servers and the checkpointing hosts already share a secret (one file deployed to
 * each), and TLS would add a certificate authority, certificates and their renewal to run a few
 * servers on a private network. Integrity of the data itself is carried per extent (SHA-256, checked
 * on receipt and again by the restoring client). What this does NOT provide: confidentiality (guest
 * memory crosses the network in the clear: anyone who can sniff the link can read it) and protection
 * against an active attacker who takes over the TCP connection after the handshake (frames are not
 * MACed one by one). Run the servers on a trusted storage network, or tunnel them (WireGuard/IPsec),
 * until a TLS transport is added.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import { UsageError, errorText } from '../core/errors.js';

export const NONCE_BYTES = 32;
export const PROOF_BYTES = 32;
/** A secret shorter than this is guessable by an offline attacker who recorded one handshake. */
export const MIN_SECRET_BYTES = 16;

const CLIENT_LABEL = Buffer.from('tlc-ms client\0');
const SERVER_LABEL = Buffer.from('tlc-ms server\0');

export function newNonce(): Buffer {
  return randomBytes(NONCE_BYTES);
}

function proof(label: Buffer, secret: Buffer, clientNonce: Buffer, serverNonce: Buffer): Buffer {
  return createHmac('sha256', secret).update(label).update(clientNonce).update(serverNonce).digest();
}

export function clientProof(secret: Buffer, clientNonce: Buffer, serverNonce: Buffer): Buffer {
  return proof(CLIENT_LABEL, secret, clientNonce, serverNonce);
}

export function serverProof(secret: Buffer, clientNonce: Buffer, serverNonce: Buffer): Buffer {
  return proof(SERVER_LABEL, secret, clientNonce, serverNonce);
}

/** Constant-time comparison (a length mismatch is not secret: proofs have a fixed size). */
export function proofMatches(expected: Buffer, got: Buffer): boolean {
  return got.length === expected.length && timingSafeEqual(expected, got);
}

/**
 * Reads the shared secret. The file must be a regular file readable by its owner only: a secret
 * others can read is no secret, and we would rather refuse to start than run with it. One trailing
 * newline is dropped (echo adds it).
 */
export function readSecretFile(file: string): Buffer {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (err) {
    throw new UsageError(`cannot read secret file ${file}: ${errorText(err)}`);
  }
  if (!st.isFile()) throw new UsageError(`secret file ${file} is not a regular file`);
  if ((st.mode & 0o077) !== 0)
    throw new UsageError(
      `secret file ${file} is readable by group or others (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}): chmod 600 ${file}`,
    );
  let secret = fs.readFileSync(file);
  if (secret.at(-1) === 0x0a) secret = secret.subarray(0, -1);
  if (secret.length < MIN_SECRET_BYTES)
    throw new UsageError(
      `secret file ${file} holds ${secret.length} bytes; use at least ${MIN_SECRET_BYTES} (e.g. head -c 32 /dev/urandom | base64 > ${file})`,
    );
  return secret;
}
