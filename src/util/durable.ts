// Synchronous durable file writes for start-up material (master key, CA keys and certificates).
// A file is durable only once its directory entry is: the data fsync alone does not survive a power
// loss that drops the rename or the create, so every helper here ends with the directory's fsync.
import fs from 'node:fs';
import path from 'node:path';

export function fsyncDirSync(dir: string): void {
  const fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function writeAllSynced(fd: number, data: Uint8Array): void {
  try {
    fs.writeSync(fd, data);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Creates a new file durably; O_EXCL, so a racing process cannot overwrite a file already in use. */
export function createDurableSync(file: string, data: Uint8Array, mode = 0o600): void {
  writeAllSynced(fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, mode), data);
  fsyncDirSync(path.dirname(file));
}

/** Replaces a file atomically and durably: a crash leaves the old content or the new, never a part. */
export function replaceDurableSync(file: string, data: Uint8Array, mode = 0o600): void {
  const tmp = `${file}.tmp`;
  writeAllSynced(fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC, mode), data);
  fs.renameSync(tmp, file);
  fsyncDirSync(path.dirname(file));
}
