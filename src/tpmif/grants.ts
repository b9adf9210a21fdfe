// Ending access to grants the backend may still have mapped: like Linux's deferred list
// (gnttab_end_foreign_access), retry until the backend unmaps, then give up and leave the page.
import type { Domain } from '../xen/index.js';
import { setTimeout as sleep } from 'node:timers/promises';

export async function endAccessEventually(dom: Domain, refs: readonly number[], tries = 50, everyMs = 20): Promise<boolean> {
  let left = [...refs];
  for (let i = 0; i < tries && left.length; i++) {
    if (dom.closed) return false;
    left = left.filter((r) => !dom.grants.endAccess(r));
    if (left.length) await sleep(everyMs);
  }
  return left.length === 0;
}
