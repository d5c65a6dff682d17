import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { TlcError } from '../core/errors.js';
import {
  SAVE_IMAGE,
  SaveImageWriter,
  decodeSaveImageHeader,
  decodeSaveImagePrefix,
  encodeSaveImagePrefix,
  writeSaveImage,
} from './save-image.js';

const XML = "<domain type='qemu'>\n  <name>web</name>\n</domain>\n";

/** The u32 at `at`, little-endian. */
const u32 = (b: Buffer, at: number): number => b.readUInt32LE(at);

describe('save image header layout', () => {
  it('writes every field at its offset (libvirt 9.0 virQEMUSaveHeader)', () => {
    const b = encodeSaveImagePrefix({ xml: XML, wasRunning: true });
    const xmlBytes = Buffer.byteLength(XML) + 1;
    assert.equal(b.toString('latin1', 0, 16), 'LibvirtQemudSave');
    assert.equal(u32(b, 16), 2, 'version');
    assert.equal(u32(b, 20), xmlBytes + 65536, 'data_len: XML, NUL, 64 KiB of padding');
    assert.equal(u32(b, 24), 1, 'was_running');
    assert.equal(u32(b, 28), 0, 'compressed: raw');
    assert.equal(u32(b, 32), 0, 'cookieOffset: no cookie');
    assert.ok(b.subarray(36, 92).equals(Buffer.alloc(56)), 'unused[14]');
    assert.equal(b.toString('utf8', 92, 92 + xmlBytes - 1), XML);
    assert.equal(b[92 + xmlBytes - 1], 0, 'the XML is NUL-terminated');
    assert.equal(b.length, 92 + xmlBytes + 65536, 'the stream starts at 92 + data_len');
    assert.ok(b.subarray(92 + xmlBytes).equals(Buffer.alloc(65536)), 'zero padding');
  });

  it('places the cookie after the XML and points cookieOffset at it', () => {
    const cookie = '<cookie/>\n';
    const b = encodeSaveImagePrefix({ xml: XML, wasRunning: false, cookie, padding: 7 });
    const xmlBytes = Buffer.byteLength(XML) + 1;
    assert.equal(u32(b, 24), 0, 'was_running');
    assert.equal(u32(b, 32), xmlBytes);
    assert.equal(u32(b, 20), xmlBytes + cookie.length + 1 + 7);
    assert.equal(b.toString('utf8', 92 + xmlBytes, 92 + xmlBytes + cookie.length), cookie);
    const back = decodeSaveImagePrefix(b);
    assert.equal(back.xml, XML);
    assert.equal(back.cookie, cookie);
    assert.equal(back.streamOffset, b.length);
  });

  it('writes the partial magic while incomplete', () => {
    const b = encodeSaveImagePrefix({ xml: XML, wasRunning: true }, false);
    assert.equal(b.toString('latin1', 0, 16), 'LibvirtQemudPart');
    assert.equal(decodeSaveImageHeader(b).complete, false);
  });

  it('matches byte for byte the prefix libvirt 9.0 wrote for `virsh save` of a TCG domain', () => {
    // Header of /tmp save image from Debian 12's libvirt 9.0.0-4+deb12u2 (domain tlc-x, 128 MiB):
    // data_len 67214 = 1441 (XML) + 1 + 235 (cookie) + 1 + 65536, cookieOffset 1442, was_running 1.
    const header = Buffer.from(
      '4c69627669727451656d756453617665' +
        '02000000' +
        '8e060100' +
        '01000000' +
        '00000000' +
        'a2050000' +
        '00'.repeat(56),
      'hex',
    );
    const h = decodeSaveImageHeader(header);
    assert.deepEqual(h, {
      complete: true,
      version: 2,
      dataLen: 67214,
      wasRunning: true,
      format: 'raw',
      cookieOffset: 1442,
    });
    const b = encodeSaveImagePrefix({ xml: LIBVIRT_XML, cookie: LIBVIRT_COOKIE, wasRunning: true });
    assert.ok(b.subarray(0, 92).equals(header), 'same 92-byte header');
    assert.equal(
      createHash('sha256').update(b).digest('hex'),
      '0a1e0293928e5905dfafef76a2840ae00b640c96c73419f380dafb1e14255131',
      'same bytes up to the QEMU stream',
    );
  });
});

describe('save image header checks', () => {
  const good = (): Buffer => encodeSaveImagePrefix({ xml: XML, wasRunning: true });
  const rejects = (b: Buffer, message: RegExp): void => {
    assert.throws(
      () => decodeSaveImagePrefix(b),
      (err: unknown) => err instanceof TlcError && err.code === 'E_CORRUPT' && message.test(err.message),
    );
  };

  it('refuses bad magic, versions, formats, lengths and truncation', () => {
    rejects(good().subarray(0, 91), /header is 92 bytes/);
    let b = good();
    b.write('LibvirtQemudXXXX', 0, 'latin1');
    rejects(b, /magic "LibvirtQemudXXXX"/);
    b = good();
    b.writeUInt32LE(1, 16);
    rejects(b, /version 1 at offset 16/);
    b = good();
    b.writeUInt32LE(5, 28);
    rejects(b, /format 5 at offset 28/);
    b = good();
    b.writeUInt32LE(0, 20);
    rejects(b, /data length 0 at offset 20/);
    b = good();
    b.writeUInt32LE(0xffffffff, 20);
    rejects(b, /out of range/);
    b = good();
    b.writeUInt32LE(u32(b, 20), 32);
    rejects(b, /cookie offset/);
    rejects(good().subarray(0, 200), /truncated/);
  });

  it('reads a big-endian header, as libvirt does', () => {
    const b = good();
    for (const at of [16, 20, 24, 28, 32]) b.writeUInt32BE(b.readUInt32LE(at), at);
    assert.equal(decodeSaveImagePrefix(b).xml, XML);
  });

  it('refuses XML that is not a domain or holds a NUL', () => {
    assert.throws(() => encodeSaveImagePrefix({ xml: '<network/>', wasRunning: true }), /not a <domain>/);
    assert.throws(() => encodeSaveImagePrefix({ xml: '<domain>\0</domain>', wasRunning: true }), /NUL/);
  });
});

describe('SaveImageWriter', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tlc-save-image-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('writes prefix then stream, and marks the image complete only at the end', async () => {
    const path = join(dir, 'a.img');
    const w = await SaveImageWriter.create(path, { xml: XML, wasRunning: true, padding: 0 });
    await Promise.all([w.write(Buffer.from('QEVM')), w.write(Buffer.from([0, 0, 0, 3]))]);
    assert.equal(readFileSync(path).toString('latin1', 0, 16), SAVE_IMAGE.PARTIAL_MAGIC);
    const size = await w.finish();
    const b = readFileSync(path);
    assert.equal(size, b.length);
    const p = decodeSaveImagePrefix(b);
    assert.equal(p.header.complete, true);
    assert.ok(b.subarray(p.streamOffset).equals(Buffer.from('QEVM\0\0\0\x03', 'latin1')));
  });

  it('writeSaveImage takes an iterable; a failing source leaves no file', async () => {
    const path = join(dir, 'b.img');
    const r = await writeSaveImage(path, { xml: XML, wasRunning: false }, [
      Buffer.from('ab'),
      Buffer.from('c'),
    ]);
    assert.equal(r.bytes, r.streamOffset + 3);
    const bad = join(dir, 'c.img');
    async function* failing(): AsyncGenerator<Buffer> {
      yield Buffer.from('x');
      throw new Error('source broke');
    }
    await assert.rejects(writeSaveImage(bad, { xml: XML, wasRunning: true }, failing()), /source broke/);
    assert.equal(existsSync(bad), false);
  });
});

/** The XML and cookie of that libvirt-written image, verbatim. */
const LIBVIRT_XML = `<domain type='qemu'>
  <name>tlc-x</name>
  <uuid>88598b5c-0784-4a83-ae10-52240039c751</uuid>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/var/lib/libvirt/images/tlc-x/vmlinuz</kernel>
    <initrd>/var/lib/libvirt/images/tlc-x/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off cryptomgr.notests 8250.nr_uarts=1 i8042.noaux i8042.nokbd nowatchdog tsc=reliable tlc.workload=memverify:32</cmdline>
    <boot dev='hd'/>
  </os>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' index='0' model='none'/>
    <serial type='file'>
      <source path='/tmp/lvx/console.log' append='on'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='/tmp/lvx/console.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <memballoon model='none'/>
  </devices>
</domain>
`;

const LIBVIRT_COOKIE = `<cookie>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='require' name='hypervisor'/>
    <feature policy='require' name='lahf_lm'/>
  </cpu>
  <slirpHelper/>
</cookie>
`;
