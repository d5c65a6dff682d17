import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Command } from 'commander';
import { TlcError } from '../core/errors.js';
import { parseAccel } from '../vm/accel.js';
import { ConsoleTail } from '../vm/console.js';
import { attachVm, killVm, startVm, stopVm, vmStatus } from '../vm/manager.js';
import { isAlive } from '../vm/process.js';
import { listVms, loadVm, removeVm, vmState } from '../vm/registry.js';
import { formatMs, note, printJson, printTable } from './output.js';
import { parseDuration, parsePositiveInt } from './units.js';

interface JsonFlag {
  json?: boolean;
}

export function registerVmCommands(program: Command): void {
  const vm = program.command('vm').description('start, watch, attach to and stop QEMU virtual machines');

  vm.command('start')
    .description('boot a VM (the bundled guest by default) and wait for its first heartbeat')
    .requiredOption('--name <name>', 'VM name')
    .option('--mem <MiB>', 'guest RAM in MiB', '256')
    .option('--cpus <n>', 'vCPUs', '1')
    .option(
      '--workload <spec>',
      'guest workload: memverify:<MiB>[:<rate>], dirty:<MiB>:<pattern>, idle',
      'idle',
    )
    .option(
      '--accel <tcg|kvm|auto>',
      'accelerator; auto uses KVM only if a bounded probe boots a guest',
      'tcg',
    )
    .option('--machine <type>', 'QEMU machine type', 'pc')
    .option('--kernel <path>', 'guest kernel (default: the bundled guest)')
    .option('--initrd <path>', 'guest initrd')
    .option('--append <line>', "kernel command line (default: the bundled guest's)")
    .option('--boot-timeout <duration>', 'how long to wait for the first heartbeat', '120s')
    .option('--json', 'print the result as JSON')
    .action(async (o: JsonFlag & Record<string, string>) => {
      const started = await startVm({
        name: o.name as string,
        memMiB: parsePositiveInt(o.mem as string, '--mem'),
        cpus: parsePositiveInt(o.cpus as string, '--cpus'),
        workload: o.workload as string,
        accel: parseAccel(o.accel as string),
        machine: o.machine as string,
        ...(o.kernel ? { kernel: o.kernel } : {}),
        ...(o.initrd ? { initrd: o.initrd } : {}),
        ...(o.append ? { append: o.append } : {}),
        bootTimeoutMs: parseDuration(o.bootTimeout as string, '--boot-timeout'),
        log: note,
      });
      const status = await vmStatus(started.record);
      if (o.json)
        printJson({ ...status, bootMs: Math.round(started.bootMs), accelReason: started.accel.reason });
      else
        note(
          `VM ${status.name} running (pid ${status.pid}, ${status.accel}), first heartbeat after ${formatMs(started.bootMs)}`,
        );
    });

  vm.command('attach')
    .description('adopt a QEMU that tlc did not start, by its QMP socket')
    .requiredOption('--name <name>', 'name to give the VM in tlc')
    .requiredOption('--qmp <path>', "the QEMU's QMP unix socket")
    .option('--json', 'print the result as JSON')
    .action(async (o: JsonFlag & { name: string; qmp: string }) => {
      const record = await attachVm(o.name, o.qmp);
      const status = await vmStatus(record);
      if (o.json) printJson({ ...status, argv: record.spec.adoptedArgv });
      else
        note(`Adopted QEMU pid ${status.pid} as "${status.name}" (${status.machine}, ${status.memMiB} MiB)`);
    });

  vm.command('ls')
    .description('list VMs')
    .option('--json', 'print as JSON')
    .action(async (o: JsonFlag) => {
      const statuses = await Promise.all(listVms().map((r) => vmStatus(r)));
      if (o.json) return printJson(statuses);
      printTable(
        ['NAME', 'STATE', 'PID', 'ACCEL', 'MEM', 'WORKLOAD'],
        statuses.map((s) => [
          s.name,
          s.runState ? `${s.state}/${s.runState}` : s.state,
          s.pid ? String(s.pid) : '-',
          s.accel,
          `${s.memMiB}M`,
          s.adopted ? '(adopted)' : (s.workload ?? '-'),
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
      for (const [k, v] of Object.entries(status)) process.stdout.write(`${k.padEnd(13)} ${String(v)}\n`);
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
