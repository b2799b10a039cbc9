// End to end against a real manager; run by crates/atelier/tests/dashboard.rs, which
// sets ATELIER_E2E_URL and friends. Never downloads a browser: Debian's Chromium.
import { defineConfig } from '@playwright/test';

export default defineConfig({
  testDir: 'e2e',
  // Two tasks under TCG: each state transition can take minutes.
  timeout: 30 * 60_000,
  expect: { timeout: 15_000 },
  workers: 1,
  retries: 0,
  reporter: [['list']],
  outputDir: 'test-results',
  use: {
    baseURL: process.env.ATELIER_E2E_URL ?? 'http://127.0.0.1:5173',
    viewport: { width: 1280, height: 800 },
    screenshot: 'only-on-failure',
    trace: 'retain-on-failure',
    actionTimeout: 30_000,
    navigationTimeout: 60_000,
    launchOptions: {
      executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium',
      // Root in CI: Chromium's own sandbox needs user namespaces it may not get.
      args: ['--no-sandbox'],
    },
  },
});
