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

/**
 * Streams a text resource (a followed log) chunk by chunk until it ends or `signal`
 * aborts; keeps at most `keep` characters.
 */
export async function streamText(path: string, onText: (all: string) => void, signal: AbortSignal, keep = 256 * 1024): Promise<void> {
  const r = await fetch(path, { credentials: 'same-origin', signal });
  if (r.status === 401) goLogin();
  if (!r.ok || !r.body) throw new Error(`${r.status} ${r.statusText}`);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let all = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    all = (all + value).slice(-keep);
    onText(all);
  }
}
