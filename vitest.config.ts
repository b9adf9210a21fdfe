import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Tests start real processes (xenstored, manager, backend, swtpm, QEMU); they need room.
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Two cores: running every file at once only makes cross-process timing noisier.
    fileParallelism: true,
    maxWorkers: 2,
    minWorkers: 1,
    globalSetup: ['test/global-setup.ts'],
  },
});
