// Data hooks: load a resource, re-read it when the event stream says it changed.
import { useCallback, useEffect, useRef, useState } from 'react';
import { stream, type StreamEvent } from '../api/events';

export interface Resource<T> {
  data: T | undefined;
  error: string | null;
  reload: () => void;
}

/**
 * Loads `load()` now and again (debounced) whenever `stale(event)` says an event
 * changed it. No polling.
 */
export function useLive<T>(
  load: () => Promise<T>,
  stale: (e: StreamEvent) => boolean,
  deps: unknown[],
): Resource<T> {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<string | null>(null);
  const loadRef = useRef(load);
  loadRef.current = load;
  const staleRef = useRef(stale);
  staleRef.current = stale;
  const seq = useRef(0);

  const reload = useCallback(() => {
    const mine = ++seq.current;
    loadRef.current().then(
      (d) => {
        if (mine === seq.current) {
          setData(d);
          setError(null);
        }
      },
      (e: unknown) => {
        if (mine === seq.current) setError(e instanceof Error ? e.message : String(e));
      },
    );
  }, []);

  useEffect(() => {
    setData(undefined);
    reload();
    let timer: ReturnType<typeof setTimeout> | null = null;
    const off = stream.subscribe((e) => {
      if (!staleRef.current(e)) return;
      if (timer) clearTimeout(timer);
      timer = setTimeout(reload, 150);
    });
    return () => {
      off();
      if (timer) clearTimeout(timer);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);

  return { data, error, reload };
}

/** Subscribes to the event stream while mounted. */
export function useEvents(on: (e: StreamEvent) => void): void {
  const ref = useRef(on);
  ref.current = on;
  useEffect(() => stream.subscribe((e) => ref.current(e)), []);
}
