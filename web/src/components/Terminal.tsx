// A web terminal: xterm.js over the sandbox's PTY WebSocket. xterm is loaded on
// demand so the rest of the app stays small.
import { useEffect, useRef, useState } from 'react';
import { parseServerFrame, ptyUrl, resizeFrame, startFrame } from '../lib/pty';

type State = 'idle' | 'connecting' | 'open' | 'closed';

export function Terminal({ sandbox }: { sandbox: string }) {
  const box = useRef<HTMLDivElement>(null);
  const [state, setState] = useState<State>('idle');
  const [note, setNote] = useState<string>('');
  const [session, setSession] = useState(0);

  useEffect(() => {
    if (session === 0 || !box.current) return;
    let disposed = false;
    let cleanup = () => {};
    setState('connecting');
    setNote('');
    void (async () => {
      const [{ Terminal: XTerm }, { FitAddon }] = await Promise.all([import('@xterm/xterm'), import('@xterm/addon-fit')]);
      await import('@xterm/xterm/css/xterm.css');
      if (disposed || !box.current) return;
      const term = new XTerm({
        cursorBlink: true,
        fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, monospace',
        fontSize: 13,
        convertEol: false,
      });
      const fit = new FitAddon();
      term.loadAddon(fit);
      term.open(box.current);
      fit.fit();
      const ws = new WebSocket(ptyUrl(sandbox));
      ws.binaryType = 'arraybuffer';
      const enc = new TextEncoder();
      ws.onopen = () => {
        ws.send(startFrame(term.rows, term.cols));
        setState('open');
        term.focus();
      };
      ws.onmessage = (m: MessageEvent<ArrayBuffer | string>) => {
        if (typeof m.data === 'string') {
          const f = parseServerFrame(m.data);
          if (f?.type === 'exit') setNote(`exited${f.code != null ? ` with code ${f.code}` : ''}${f.signal != null ? ` (signal ${f.signal})` : ''}`);
          if (f?.type === 'error') setNote(f.message);
          return;
        }
        term.write(new Uint8Array(m.data));
      };
      ws.onclose = (e) => {
        setState('closed');
        if (e.code !== 1000 && e.code !== 1005) setNote((n) => n || `connection closed (${e.code}${e.reason ? `: ${e.reason}` : ''})`);
      };
      ws.onerror = () => setNote((n) => n || 'could not connect to the sandbox terminal');
      const d1 = term.onData((s) => {
        if (ws.readyState === WebSocket.OPEN) ws.send(enc.encode(s));
      });
      const d2 = term.onResize(({ rows, cols }) => {
        if (ws.readyState === WebSocket.OPEN) ws.send(resizeFrame(rows, cols));
      });
      const ro = new ResizeObserver(() => {
        try {
          fit.fit();
        } catch {
          /* hidden */
        }
      });
      ro.observe(box.current);
      cleanup = () => {
        ro.disconnect();
        d1.dispose();
        d2.dispose();
        ws.close(1000);
        term.dispose();
      };
    })().catch((e: unknown) => {
      setNote(String(e));
      setState('closed');
    });
    return () => {
      disposed = true;
      cleanup();
    };
  }, [sandbox, session]);

  return (
    <div className="terminal-wrap">
      <div className="row between">
        <span className="small-text" data-testid="terminal-state">
          Terminal: {state}
          {note ? ` · ${note}` : ''}
        </span>
        <button type="button" className="small" onClick={() => setSession((s) => s + 1)}>
          {state === 'idle' ? 'Open terminal' : 'Reconnect'}
        </button>
      </div>
      <div ref={box} className={session ? 'terminal' : 'terminal hidden'} data-testid="terminal" />
    </div>
  );
}
