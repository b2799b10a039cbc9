// The committed client types must be what openapi-typescript makes of
// docs/openapi.json now: run `npm run gen` after the server's API changes.
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

describe('the generated API types', () => {
  it('match a fresh generation from docs/openapi.json', () => {
    const web = resolve(__dirname, '../..');
    const out = join(mkdtempSync(join(tmpdir(), 'atelier-schema-')), 'schema.d.ts');
    execFileSync(process.execPath, [join(web, 'node_modules/openapi-typescript/bin/cli.js'), join(web, '../docs/openapi.json'), '-o', out], {
      stdio: 'pipe',
    });
    const fresh = readFileSync(out, 'utf8');
    const committed = readFileSync(join(web, 'src/api/schema.d.ts'), 'utf8');
    expect(committed === fresh, 'src/api/schema.d.ts is out of date: run `npm --prefix web run gen` and commit it').toBe(true);
  }, 60_000);
});
