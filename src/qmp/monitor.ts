import type { QmpClient } from './client.js';

/**
 * What tlc needs of a QEMU monitor: QMP commands with typed replies, and events. A QMP socket
 * (QmpClient) and libvirt's monitor passthrough (LibvirtMonitor) both provide it.
 */
export type Monitor = Pick<QmpClient, 'execute' | 'on' | 'off' | 'waitEvent' | 'close' | 'closed'>;
