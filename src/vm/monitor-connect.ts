import { LibvirtMonitor } from '../libvirt/monitor.js';
import { QmpClient } from '../qmp/client.js';
import type { Monitor } from '../qmp/monitor.js';

/** Where a VM's monitor is: its own QMP socket, or libvirt's passthrough for a libvirt domain. */
export interface MonitorAddress {
  qmpSocket: string;
  libvirt?: { domain: string; uri: string };
}

export async function openMonitor(at: MonitorAddress, timeoutMs = 5000): Promise<Monitor> {
  if (at.libvirt) return LibvirtMonitor.connect(at.libvirt.domain, { uri: at.libvirt.uri, timeoutMs });
  return QmpClient.connect(at.qmpSocket, { timeoutMs });
}
