/** QEMU 7.2 migration stream: constants, incremental reader, writer. */
export { QEMU, LAYOUT, compressBound } from './constants.js';
export {
  MigrationStreamReader,
  applyXbzrle,
  parseConfiguration,
  DEFAULT_MAX_RAM_BYTES,
  DEFAULT_MAX_DEVICE_STATE_BYTES,
  type ConfigurationInfo,
  type DeviceStateInfo,
  type RamBlockInfo,
  type RamSectionHeader,
  type RamSectionKind,
  type ReaderOptions,
  type StreamSink,
} from './reader.js';
export { MigrationStreamWriter, type ChunkSink, type WriterOptions } from './writer.js';
export { verifyDeviceState, VMDESC_MAX_BYTES } from './vmdesc.js';
