import { describe, expect, it, vi } from 'vitest';
import { CSRF_HEADER, loginUrl, makeClient } from './client';

function recorder(status = 200, body: unknown = []) {
  const seen: Request[] = [];
  const f = vi.fn(async (input: Request) => {
    seen.push(input);
    return new Response(JSON.stringify(body), { status, headers: { 'Content-Type': 'application/json' } });
  });
  return { seen, f: f as unknown as typeof fetch };
}

describe('the API client', () => {
  it('sends the CSRF header on state-changing requests only, with same-origin credentials', async () => {
    const { seen, f } = recorder(201, {});
    const c = makeClient({ baseUrl: 'http://localhost', fetch: f, csrf: () => 'tok-123', onUnauthorized: () => {} });
    await c.GET('/api/v1/tasks');
    await c.POST('/api/v1/tasks/{id}/start', { params: { path: { id: 'tk-1' } } });
    await c.DELETE('/api/v1/sandboxes/{id}', { params: { path: { id: 'sb-1' } } });
    expect(seen).toHaveLength(3);
    expect(seen[0]!.headers.get(CSRF_HEADER)).toBeNull();
    expect(seen[1]!.headers.get(CSRF_HEADER)).toBe('tok-123');
    expect(seen[1]!.url).toBe('http://localhost/api/v1/tasks/tk-1/start');
    expect(seen[2]!.headers.get(CSRF_HEADER)).toBe('tok-123');
    for (const r of seen) expect(r.credentials).toBe('same-origin');
  });
  it('sends no CSRF header when none is known (bearer-token dev mode)', async () => {
    const { seen, f } = recorder(201, {});
    const c = makeClient({ baseUrl: 'http://localhost', fetch: f, csrf: () => null, onUnauthorized: () => {} });
    await c.POST('/api/v1/tasks/{id}/cancel', { params: { path: { id: 'tk-1' } } });
    expect(seen[0]!.headers.has(CSRF_HEADER)).toBe(false);
  });
  it('calls onUnauthorized on a 401', async () => {
    const { f } = recorder(401, { code: 'unauthorized', message: 'no session', request_id: 'r' });
    const on = vi.fn();
    const c = makeClient({ baseUrl: 'http://localhost', fetch: f, csrf: () => null, onUnauthorized: on });
    const r = await c.GET('/api/v1/tasks');
    expect(on).toHaveBeenCalledOnce();
    expect(r.error).toMatchObject({ code: 'unauthorized' });
  });
  it('builds the sign-in URL with the way back', () => {
    expect(loginUrl({ pathname: '/tasks/tk-1', search: '?x=1', hash: '' })).toBe('/login?next=%2Ftasks%2Ftk-1%3Fx%3D1');
  });
});
