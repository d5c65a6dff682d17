import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Command } from 'commander';
import { TlcError, UsageError, errorText } from '../core/errors.js';
import { parseAccel } from '../vm/accel.js';
import { ConsoleTail } from '../vm/console.js';
import { modeSupport } from '../vm/memory-layout.js';
import {
  type ReadyCondition,
  type VmStatus,
  attachLibvirt,
  attachVm,
  killVm,
  startVm,
  stopVm,
  vmStatus,
} from '../vm/manager.js';
import { isAlive } from '../vm/process.js';
import { listVms, loadVm, removeVm, vmState } from '../vm/registry.js';
import { parseDiskArg } from '../vm/spec.js';
import { formatMs, note, printJson, printTable } from './output.js';
import { parseDuration, parsePositiveInt } from './units.js';

interface JsonFlag {
  json?: boolean;
}

interface StartFlags extends JsonFlag {
  name: string;
  mem: string;
  cpus: string;
  workload?: string;
  disk: string[];
  qemuArg: string[];
  ready?: string;
  wait: boolean;
  accel: string;
  machine: string;
  kernel?: string;
  initrd?: string;
  append?: string;
  bootTimeout: string;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function readyFlags(o: StartFlags): { ready?: ReadyCondition } {
  if (o.ready !== undefined && !o.wait)
    throw new TlcError('E_USAGE', 'Give either --ready or --no-wait, not both');
  if (!o.wait) return { ready: { kind: 'qemu' } };
  if (o.ready === undefined) return {};
  try {
    return { ready: { kind: 'line', pattern: new RegExp(o.ready) } };
  } catch (err) {
    throw new TlcError('E_USAGE', `--ready ${o.ready}: not a regular expression (${errorText(err)})`);
  }
}

function readyText(status: VmStatus, o: StartFlags): string {
  if (o.ready !== undefined) return `console line /${o.ready}/`;
  if (!o.wait || status.guest === 'custom') return 'QEMU running';
  return 'first heartbeat';
}

/** The WORKLOAD column: the bundled guest's workload, `custom` or `(adopted)`. */
function guestText(s: VmStatus): string {
  if (s.guest === 'adopted') return '(adopted)';
  return s.guest === 'custom' ? 'custom' : (s.workload ?? '-');
}

export function registerVmCommands(program: Command): void {
  const vm = program.command('vm').description('start, watch, attach to and stop QEMU virtual machines');

  vm.command('start')
    .description(
      'boot a VM and wait until it is ready: the bundled guest by default (ready at its first ' +
        'heartbeat), or your own kernel or disk (--kernel, --disk with --ready or --no-wait)',
    )
    .requiredOption('--name <name>', 'VM name')
    .option('--mem <MiB>', 'guest RAM in MiB', '256')
    .option('--cpus <n>', 'vCPUs', '1')
    .option(
      '--workload <spec>',
      'bundled guest workload: memverify:<MiB>[:<rate>[:grow]], dirty:<MiB>:<pattern>, idle, diskverify:<records> ' +
        '(needs --disk), or diskverify:<records>+<memverify or dirty spec> (default: idle)',
    )
    .option(
      '--disk <path[,format=qcow2|raw][,readonly=on]>',
      'virtio-blk disk image, repeatable (format probed when not given; ",," for a comma in the path)',
      collect,
      [] as string[],
    )
    .option(
      '--qemu-arg <arg>',
      'extra QEMU argument, repeatable, passed verbatim (e.g. --qemu-arg=-device)',
      collect,
      [] as string[],
    )
    .option('--ready <regex>', 'ready when a console line matches this (a guest other than the bundled one)')
    .option('--no-wait', 'return as soon as QEMU runs (a guest other than the bundled one)')
    .option(
      '--accel <tcg|kvm|auto>',
      'accelerator; auto uses KVM only if a bounded probe boots a guest',
      'tcg',
    )
    .option('--machine <type>', 'QEMU machine type', 'pc')
    .option('--kernel <path>', 'guest kernel (default: the bundled guest); without --workload a custom guest')
    .option('--initrd <path>', 'guest initrd')
    .option(
      '--append <line>',
      "kernel command line (default: the bundled guest's; console=ttyS0 for --kernel)",
    )
    .option('--boot-timeout <duration>', 'how long to wait until the guest is ready', '120s')
    .option('--json', 'print the result as JSON')
    .action(async (o: StartFlags) => {
      const started = await startVm({
        name: o.name,
        memMiB: parsePositiveInt(o.mem, '--mem'),
        cpus: parsePositiveInt(o.cpus, '--cpus'),
        ...(o.workload ? { workload: o.workload } : {}),
        accel: parseAccel(o.accel),
        machine: o.machine,
        ...(o.kernel ? { kernel: o.kernel } : {}),
        ...(o.initrd ? { initrd: o.initrd } : {}),
        ...(o.append ? { append: o.append } : {}),
        disks: o.disk.map(parseDiskArg),
        extraArgs: o.qemuArg,
        ...readyFlags(o),
        bootTimeoutMs: parseDuration(o.bootTimeout, '--boot-timeout'),
        log: note,
      });
      const status = await vmStatus(started.record);
      if (o.json)
        printJson({ ...status, bootMs: Math.round(started.bootMs), accelReason: started.accel.reason });
      else {
        const what = readyText(status, o);
        note(
          `VM ${status.name} running (pid ${status.pid}, ${status.accel}), ${what} after ${formatMs(started.bootMs)}`,
        );
      }
    });

  vm.command('attach')
    .description('adopt a QEMU that tlc did not start: by its QMP socket, or a libvirt domain by name')
    .requiredOption('--name <name>', 'name to give the VM in tlc')
    .option('--qmp <path>', "the QEMU's QMP unix socket")
    .option('--libvirt <domain>', 'a libvirt domain (its monitor is reached through libvirt)')
    .option('--connect <uri>', 'libvirt connection URI', 'qemu:///system')
    .option('--json', 'print the result as JSON')
    .action(async (o: JsonFlag & { name: string; qmp?: string; libvirt?: string; connect: string }) => {
      if (Boolean(o.qmp) === Boolean(o.libvirt))
        throw new UsageError('give exactly one of --qmp PATH or --libvirt DOMAIN');
      const record = o.libvirt
        ? await attachLibvirt(o.name, o.libvirt, o.connect)
        : await attachVm(o.name, o.qmp as string);
      const status = await vmStatus(record);
      const modes = modeSupport(record.spec.accel, record.spec.memory, record.process);
      const ram = `RAM block ${record.spec.ramBlock ?? 'ram0'} (${record.spec.memory.kind})`;
      if (o.json)
        return printJson({
          ...status,
          ramBlock: record.spec.ramBlock ?? 'ram0',
          memory: record.spec.memory,
          modes,
          argv: record.spec.adoptedArgv,
        });
      note(
        `Adopted QEMU pid ${status.pid} as "${status.name}" (${status.machine}, ${status.memMiB} MiB, ${ram})`,
      );
      for (const [mode, s] of Object.entries(modes) as [string, { ok: boolean; why: string }][])
        note(`  checkpoint --mode ${mode.padEnd(4)} ${s.ok ? 'yes' : 'NO '}  ${s.why}`);
      note(
        `  restore: lazy (the image supplies backend "${record.spec.ramBlock ?? 'ram0'}") and --eager; writable disks it has are refused unless --allow-inconsistent-disks`,
      );
    });

  vm.command('ls')
    .description('list VMs')
    .option('--json', 'print as JSON')
    .action(async (o: JsonFlag) => {
      const statuses = await Promise.all(listVms().map((r) => vmStatus(r)));
      if (o.json) return printJson(statuses);
      printTable(
        ['NAME', 'STATE', 'PID', 'ACCEL', 'MEM', 'WORKLOAD', 'DISKS'],
        statuses.map((s) => [
          s.name,
          s.runState ? `${s.state}/${s.runState}` : s.state,
          s.pid ? String(s.pid) : '-',
          s.accel,
          `${s.memMiB}M`,
          guestText(s),
          s.disks ? String(s.disks.length) : '-',
        ]),
      );
    });

  vm.command('status')
    .description('show one VM')
    .argument('<name>')
    .option('--json', 'print as JSON')
    .action(async (name: string, o: JsonFlag) => {
      const status = await vmStatus(loadVm(name));
      if (o.json) return printJson(status);
      const { disks, ...rest } = status;
      for (const [k, v] of Object.entries(rest)) process.stdout.write(`${k.padEnd(13)} ${String(v)}\n`);
      for (const d of disks ?? []) {
        const ro = d.readOnly ? ', read-only' : '';
        process.stdout.write(`${'disk'.padEnd(13)} ${d.device} ${d.path} (${d.format}${ro})\n`);
      }
      if (status.state !== 'running') process.exitCode = 3;
    });

  vm.command('console')
    .description('print the serial console log')
    .argument('<name>')
    .option('-f, --follow', 'keep printing new output until the VM stops (Ctrl-C to leave)')
    .action(async (name: string, o: { follow?: boolean }) => {
      const record = loadVm(name);
      const file = record.paths.consoleLog;
      if (!file || !fs.existsSync(file)) throw new TlcError('E_NOT_FOUND', `VM "${name}" has no console log`);
      const tail = new ConsoleTail(file);
      const print = (): void => {
        for (const line of tail.readLines()) process.stdout.write(line + '\n');
      };
      print();
      if (!o.follow) return;
      while (record.process && isAlive(record.process)) {
        await sleep(100);
        print();
      }
      print();
    });

  vm.command('stop')
    .description('stop a VM (QMP quit, then signals for a QEMU tlc started)')
    .argument('<name>')
    .option('--force', 'kill at once')
    .option('--rm', 'also forget the VM (its console log and spec)')
    .option('--json', 'print the result as JSON')
    .action(async (name: string, o: JsonFlag & { force?: boolean; rm?: boolean }) => {
      const result = o.force ? await killVm(name) : await stopVm(name);
      if (o.rm) removeVm(name);
      if (o.json) printJson({ name, ...result, removed: Boolean(o.rm) });
      else note(result.wasRunning ? `VM ${name} stopped` : `VM ${name} was not running`);
    });

  vm.command('rm')
    .description('forget a stopped VM')
    .argument('<name>')
    .action((name: string) => {
      const record = loadVm(name);
      if (vmState(record) === 'running')
        throw new TlcError('E_VM_EXISTS', `VM "${name}" is running; stop it first`);
      removeVm(name);
    });
}
