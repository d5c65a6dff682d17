import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { guestDomainXml } from './domain-xml.js';

const base = {
  name: 'web',
  memMiB: 128,
  kernel: '/var/lib/libvirt/images/web/vmlinuz',
  initrd: '/var/lib/libvirt/images/web/initrd.gz',
  cmdline: 'console=ttyS0 tlc.workload=memverify:32',
  consoleLog: '/var/log/tlc/web console.log',
};

describe('guestDomainXml', () => {
  it('boots the kernel with its command line, a serial file and nothing else', () => {
    const xml = guestDomainXml(base);
    assert.match(xml, /^<domain type='qemu'>\n {2}<name>web<\/name>/);
    assert.match(xml, /<memory unit='MiB'>128<\/memory>/);
    assert.match(xml, /<kernel>\/var\/lib\/libvirt\/images\/web\/vmlinuz<\/kernel>/);
    assert.match(xml, /<cmdline>console=ttyS0 tlc.workload=memverify:32<\/cmdline>/);
    assert.match(
      xml,
      /<serial type='file'>\n {6}<source path='\/var\/log\/tlc\/web console.log' append='on'\/>/,
    );
    assert.match(xml, /<controller type='usb' model='none'\/>/);
    assert.match(xml, /<memballoon model='none'\/>/);
    assert.match(xml, /<features>\n {4}<acpi\/>\n {2}<\/features>/);
    assert.doesNotMatch(xml, /memoryBacking|<interface|<disk/);
  });

  it('asks for shared memfd RAM and KVM when told', () => {
    const xml = guestDomainXml({ ...base, memfd: true, type: 'kvm', vcpus: 2 });
    assert.match(
      xml,
      /<memoryBacking>\n {4}<source type='memfd'\/>\n {4}<access mode='shared'\/>\n {2}<\/memoryBacking>/,
    );
    assert.match(xml, /^<domain type='kvm'>/);
    assert.match(xml, /<vcpu>2<\/vcpu>/);
  });

  it('escapes text and refuses bad names, sizes and relative paths', () => {
    const xml = guestDomainXml({ ...base, cmdline: `a<b & "c" 'd'` });
    assert.match(xml, /<cmdline>a&#60;b &#38; &#34;c&#34; &#39;d&#39;<\/cmdline>/);
    assert.throws(() => guestDomainXml({ ...base, name: 'a b' }), /Invalid domain name/);
    assert.throws(() => guestDomainXml({ ...base, name: "x'><evil/>" }), /Invalid domain name/);
    assert.throws(() => guestDomainXml({ ...base, memMiB: 1.5 }), /memory/);
    assert.throws(() => guestDomainXml({ ...base, kernel: 'vmlinuz' }), /absolute/);
    assert.throws(() => guestDomainXml({ ...base, uuid: 'nope' }), /UUID/);
  });
});
