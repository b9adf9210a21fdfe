// Node options for a vTPM-domain process (multi and stubdom modes). A domain holds one TPM and a few
// buffers; V8's defaults size its heaps for a server (docs/multi-vm.md, "A lean domain"): a 1 MiB
// young generation instead of 8 (16 MiB committed at worst), an old generation capped far above what one
// TPM needs, and gc() for collecting start-up garbage (src/util/heap.ts).
// VTPM_DOMAIN_NODE_FLAGS replaces them (space-separated; empty: node's defaults).
export const DEFAULT_DOMAIN_NODE_FLAGS = ['--max-semi-space-size=1', '--max-old-space-size=64', '--expose-gc'];

export function domainNodeFlags(env: NodeJS.ProcessEnv = process.env): string[] {
  const v = env.VTPM_DOMAIN_NODE_FLAGS;
  if (v === undefined) return DEFAULT_DOMAIN_NODE_FLAGS;
  return v.split(/\s+/).filter((f) => f !== '');
}
