/** Typed requests and replies for the QMP commands tlc uses (QEMU 7.2 schema names). */

export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover'
  | 'device'
  | 'wait-unplug';

export interface MigrationRamStats {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  mbps: number;
  'dirty-sync-count': number;
  'page-size': number;
  'pages-per-second': number;
  'precopy-bytes'?: number;
  'downtime-bytes'?: number;
}

export interface MigrationInfo {
  status?: MigrationStatus;
  'setup-time'?: number;
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  ram?: MigrationRamStats;
  'cpu-throttle-percentage'?: number;
  'error-desc'?: string;
}

export type MigrationCapabilityName =
  | 'xbzrle'
  | 'auto-converge'
  | 'events'
  | 'postcopy-ram'
  | 'return-path'
  | 'pause-before-switchover'
  | 'multifd'
  | 'x-ignore-shared'
  | 'background-snapshot';

export interface MigrationParameters {
  'throttle-trigger-threshold'?: number;
  'max-bandwidth'?: number;
  'downtime-limit'?: number;
  'cpu-throttle-initial'?: number;
  'cpu-throttle-increment'?: number;
  'cpu-throttle-tailslow'?: boolean;
  'max-cpu-throttle'?: number;
}

export type RunState =
  | 'debug'
  | 'inmigrate'
  | 'internal-error'
  | 'io-error'
  | 'paused'
  | 'postmigrate'
  | 'prelaunch'
  | 'finish-migrate'
  | 'restore-vm'
  | 'running'
  | 'save-vm'
  | 'shutdown'
  | 'suspended'
  | 'watchdog'
  | 'guest-panicked'
  | 'colo';

export interface StatusInfo {
  running: boolean;
  singlestep?: boolean;
  status: RunState;
}

export interface QemuVersion {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

/** Command name → [arguments, return value]. Only the commands tlc sends. */
export interface QmpCommands {
  qmp_capabilities: [Record<string, never> | undefined, Record<string, never>];
  'query-status': [undefined, StatusInfo];
  'query-version': [undefined, QemuVersion];
  'query-migrate': [undefined, MigrationInfo];
  'query-migrate-parameters': [undefined, MigrationParameters];
  'query-migrate-capabilities': [undefined, { capability: MigrationCapabilityName; state: boolean }[]];
  'query-machines': [undefined, { name: string; alias?: string; 'is-default'?: boolean }[]];
  'query-kvm': [undefined, { enabled: boolean; present: boolean }];
  'query-memdev': [undefined, { id?: string; size: number; share: boolean; prealloc: boolean }[]];
  'qom-get': [{ path: string; property: string }, unknown];
  'qom-list': [{ path: string }, { name: string; type: string }[]];
  'migrate-set-capabilities': [
    { capabilities: { capability: MigrationCapabilityName; state: boolean }[] },
    Record<string, never>,
  ];
  'migrate-set-parameters': [MigrationParameters, Record<string, never>];
  migrate: [{ uri: string }, Record<string, never>];
  migrate_cancel: [undefined, Record<string, never>];
  'migrate-incoming': [{ uri: string }, Record<string, never>];
  'calc-dirty-rate': [{ 'calc-time': number; 'sample-pages'?: number }, Record<string, never>];
  'query-dirty-rate': [undefined, { status: 'unstarted' | 'measuring' | 'measured'; 'dirty-rate'?: number }];
  'query-fdsets': [undefined, { 'fdset-id': number; fds: { fd: number; opaque?: string }[] }[]];
  'remove-fd': [{ 'fdset-id': number; fd?: number }, Record<string, never>];
  'migrate-continue': [{ state: 'pre-switchover' }, Record<string, never>];
  transaction: [{ actions: TransactionAction[] }, Record<string, never>];
  'blockdev-add': [Record<string, unknown>, Record<string, never>];
  'blockdev-del': [{ 'node-name': string }, Record<string, never>];
  'block-dirty-bitmap-remove': [{ node: string; name: string }, Record<string, never>];
  'block-job-set-speed': [{ device: string; speed: number }, Record<string, never>];
  'block-job-cancel': [{ device: string; force?: boolean }, Record<string, never>];
  'query-block-jobs': [
    undefined,
    { device: string; type: string; status?: string; len: number; offset: number }[],
  ];
  'query-block': [
    undefined,
    {
      device: string;
      qdev?: string;
      inserted?: { 'node-name': string; ro: boolean; file: string; drv: string };
    }[],
  ];
  'query-named-block-nodes': [
    { flat?: boolean } | undefined,
    {
      'node-name': string;
      drv: string;
      file: string;
      ro: boolean;
      image: { 'virtual-size': number; filename: string; format: string };
      'dirty-bitmaps'?: { name?: string; count: number; granularity: number }[];
    }[],
  ];
  stop: [undefined, Record<string, never>];
  cont: [undefined, Record<string, never>];
  quit: [undefined, Record<string, never>];
}

export type QmpCommandName = keyof QmpCommands;

/** One action of a QMP `transaction`: all happen at the same instant, or none. */
export type TransactionAction =
  | { type: 'block-dirty-bitmap-add'; data: { node: string; name: string; persistent?: boolean } }
  | {
      type: 'blockdev-backup';
      data: {
        'job-id': string;
        device: string;
        target: string;
        sync: 'full' | 'bitmap' | 'top' | 'none';
        bitmap?: string;
        'bitmap-mode'?: 'on-success' | 'never' | 'always';
        speed?: number;
        'auto-finalize'?: boolean;
        'auto-dismiss'?: boolean;
      };
    };

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}
