// Requests the typed client cannot express well (raw bodies), with the session's
// CSRF header.
import { CSRF_HEADER, csrf, goLogin } from './client';

export async function putRaw(path: string, body: string, contentType = 'application/octet-stream'): Promise<void> {
  const headers: Record<string, string> = { 'Content-Type': contentType };
  const c = csrf();
  if (c) headers[CSRF_HEADER] = c;
  const r = await fetch(path, { method: 'PUT', body, headers, credentials: 'same-origin' });
  if (r.status === 401) goLogin();
  if (!r.ok) {
    let msg = `${r.status}`;
    try {
      const j = (await r.json()) as { message?: string };
      if (j.message) msg = j.message;
    } catch {
      /* not json */
    }
    throw new Error(msg);
  }
}
