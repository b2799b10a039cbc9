// The typed API client: openapi-fetch over the generated schema, with the browser
// session's CSRF header on state-changing requests and a sign-in redirect on 401.
import createClient, { type Client, type Middleware } from 'openapi-fetch';
import type { components, paths } from './schema';

/** What `GET /api/v1/me` answers: how we are signed in, and the CSRF token. */
export type Me = components['schemas']['MeView'];

export const CSRF_HEADER = 'X-Atelier-Csrf';

/** The sign-in page for the current location. */
export function loginUrl(loc: { pathname: string; search: string; hash?: string }): string {
  const next = loc.pathname + loc.search + (loc.hash ?? '');
  return `/login?next=${encodeURIComponent(next)}`;
}

export interface ClientOptions {
  baseUrl?: string;
  fetch?: typeof fetch;
  /** The CSRF token to send on non-GET requests (null: none known). */
  csrf: () => string | null;
  /** Called on a 401 answer (the app sends the browser to /login). */
  onUnauthorized: () => void;
}

/** Builds the API client (one per app; tests build their own). */
export function makeClient(opts: ClientOptions): Client<paths> {
  const client = createClient<paths>({
    baseUrl: opts.baseUrl ?? '',
    credentials: 'same-origin',
    fetch: opts.fetch,
  });
  const mw: Middleware = {
    onRequest({ request }) {
      if (request.method !== 'GET' && request.method !== 'HEAD') {
        const token = opts.csrf();
        if (token) request.headers.set(CSRF_HEADER, token);
      }
      return request;
    },
    onResponse({ response }) {
      if (response.status === 401) opts.onUnauthorized();
      return response;
    },
  };
  client.use(mw);
  return client;
}

let csrfToken: string | null = null;
let me: Me | null = null;

let leaving = false;

/** Sends the browser to the sign-in page, coming back here after (once). */
export function goLogin(): void {
  if (leaving) return;
  leaving = true;
  window.location.assign(loginUrl(window.location));
}

/** The app's client. */
export const api = makeClient({
  baseUrl: typeof window === 'undefined' ? 'http://localhost' : window.location.origin,
  csrf: () => csrfToken,
  onUnauthorized: goLogin,
});

/**
 * Reads who we are (and the CSRF token); a 401 goes to the sign-in page. Behind the
 * dev proxy (which adds a bearer token) `via` is `token` and there is no CSRF token.
 */
export async function loadMe(): Promise<Me | null> {
  const r = await api.GET('/api/v1/me');
  if (!r.data) return null;
  me = r.data;
  csrfToken = me.csrf ?? null;
  return me;
}

/** The signed-in identity, once loaded. */
export function currentMe(): Me | null {
  return me;
}

/** The CSRF token for hand-made requests (fetch outside the typed client). */
export function csrf(): string | null {
  return csrfToken;
}

/** Signs out (ends the browser session) and goes to the sign-in page. */
export async function logout(): Promise<void> {
  const headers: Record<string, string> = {};
  if (csrfToken) headers[CSRF_HEADER] = csrfToken;
  await fetch('/logout', { method: 'POST', credentials: 'same-origin', headers });
  window.location.assign('/login');
}

/** A readable message from an error answer. */
export function errorText(e: unknown): string {
  if (e && typeof e === 'object' && 'message' in e && typeof e.message === 'string') {
    const code = 'code' in e && typeof e.code === 'string' ? `${e.code}: ` : '';
    return code + e.message;
  }
  return String(e);
}

/** Fetches a text resource (diffs, logs) with the session. */
export async function getText(path: string): Promise<string> {
  const r = await fetch(path, { credentials: 'same-origin' });
  if (r.status === 401) goLogin();
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try {
      msg = errorText(await r.json());
    } catch {
      /* not json */
    }
    throw new Error(msg);
  }
  return r.text();
}
