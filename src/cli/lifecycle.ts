// Long-running subcommands stop cleanly on SIGINT/SIGTERM: run the stop hooks once, in reverse order
// of registration, then exit. A second signal while stopping exits at once.
type Hook = () => void | Promise<void>;

const hooks: Hook[] = [];
let stopping = false;
let installed = false;

export function onStop(hook: Hook): void {
  hooks.push(hook);
  if (installed) return;
  installed = true;
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      if (stopping) process.exit(130);
      stopping = true;
      void runHooks().then(() => process.exit(0));
    });
  }
}

async function runHooks(): Promise<void> {
  for (const h of hooks.reverse()) {
    try {
      await h();
    } catch (err) {
      process.stderr.write(`stop hook failed: ${err instanceof Error ? err.message : String(err)}\n`);
    }
  }
}
