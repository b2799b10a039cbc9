// The live event stream (`/api/v1/events`, Server-Sent Events), shared by every page:
// one EventSource, resumed after its last id when it has to be rebuilt.
import type { AtelierEvent } from './types';

/** What listeners get: a manager event, or a signal to re-read everything. */
export type StreamEvent = AtelierEvent | { type: 'resync' } | { type: 'lagged'; missed: number };

/** The manager's event types (the SSE `event:` names). */
export const EVENT_TYPES = [
  'sandbox.created',
  'sandbox.state',
  'sandbox.deleted',
  'prebuild.status',
  'prebuild.log',
  'dev.state',
  'workspace.changed',
  'sandbox.agent',
  'task.changed',
  'attention.changed',
] as const;

type Listener = (e: StreamEvent) => void;

/** Reconnect delay after the n-th consecutive failure: 1 s doubling to 30 s, jittered. */
export function backoffMs(failures: number, rand: () => number = Math.random): number {
  const base = Math.min(30_000, 1000 * 2 ** Math.max(0, failures - 1));
  return Math.round(base * (0.75 + rand() * 0.5));
}

/** The stream URL, resuming after `lastId` when there is one. */
export function streamUrl(lastId: number | null): string {
  return lastId === null ? '/api/v1/events' : `/api/v1/events?last_event_id=${lastId}`;
}

export type Status = 'connecting' | 'open' | 'down';

class Stream {
  private es: EventSource | null = null;
  private listeners = new Set<Listener>();
  private statusListeners = new Set<(s: Status) => void>();
  private lastId: number | null = null;
  private failures = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  status: Status = 'connecting';

  subscribe(l: Listener): () => void {
    this.listeners.add(l);
    this.ensure();
    return () => this.listeners.delete(l);
  }

  onStatus(l: (s: Status) => void): () => void {
    this.statusListeners.add(l);
    l(this.status);
    return () => this.statusListeners.delete(l);
  }

  private setStatus(s: Status) {
    this.status = s;
    for (const l of this.statusListeners) l(s);
  }

  private emit(e: StreamEvent) {
    for (const l of this.listeners) l(e);
  }

  private ensure() {
    if (this.es || this.timer || typeof EventSource === 'undefined') return;
    this.connect();
  }

  private connect() {
    this.timer = null;
    const es = new EventSource(streamUrl(this.lastId), { withCredentials: true });
    this.es = es;
    this.setStatus('connecting');
    es.onopen = () => {
      // After a rebuilt connection we may have missed events: re-read.
      if (this.failures > 0) this.emit({ type: 'resync' });
      this.failures = 0;
      this.setStatus('open');
    };
    const onEvent = (m: MessageEvent<string>) => {
      if (m.lastEventId) {
        const n = Number(m.lastEventId);
        if (Number.isFinite(n)) this.lastId = n;
      }
      try {
        this.emit(JSON.parse(m.data) as StreamEvent);
      } catch {
        /* a malformed line is skipped */
      }
    };
    for (const t of EVENT_TYPES) es.addEventListener(t, onEvent as EventListener);
    es.addEventListener('resync', () => this.emit({ type: 'resync' }));
    es.addEventListener('lagged', ((m: MessageEvent<string>) => {
      let missed = 0;
      try {
        missed = (JSON.parse(m.data) as { missed: number }).missed;
      } catch {
        /* keep 0 */
      }
      this.emit({ type: 'lagged', missed });
      this.emit({ type: 'resync' });
    }) as EventListener);
    es.onerror = () => {
      // The browser retries by itself while CONNECTING; once CLOSED (an HTTP error,
      // e.g. a restarted manager) we rebuild it with back-off, resuming after lastId.
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        this.es = null;
        this.failures += 1;
        this.setStatus('down');
        this.timer = setTimeout(() => this.connect(), backoffMs(this.failures));
      } else {
        this.failures = Math.max(this.failures, 1);
        this.setStatus('connecting');
      }
    };
  }
}

/** The app's one event stream. */
export const stream = new Stream();
