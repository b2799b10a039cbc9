/// <reference types="vitest" />
import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

// Dev mode: the dashboard talks to a running manager through this proxy.
// ATELIER_URL is the manager (default http://127.0.0.1:7070); ATELIER_TOKEN, when
// set, is added as a bearer token so no browser sign-in is needed while developing.
const target = process.env.ATELIER_URL ?? 'http://127.0.0.1:7070';
const token = process.env.ATELIER_TOKEN;
const headers: Record<string, string> = token ? { Authorization: `Bearer ${token}` } : {};
const proxy = {
  '/api': { target, changeOrigin: true, ws: true, headers },
  '/login': { target, changeOrigin: true },
  '/logout': { target, changeOrigin: true },
};

export default defineConfig({
  base: '/',
  plugins: [react()],
  server: { proxy },
  preview: { proxy },
  build: { outDir: 'dist', assetsDir: 'assets', sourcemap: false, target: 'es2020' },
  test: {
    environment: 'jsdom',
    include: ['src/**/*.test.{ts,tsx}'],
  },
});
