// The reader thread of unix-rights.ts: poll + recvmsg over every registered control socket.
import { workerData, type MessagePort } from 'node:worker_threads';
import { workerMain } from './unix-rights.js';

const d = workerData as { wakeFd: number; port: MessagePort };
workerMain(d.wakeFd, d.port);
