// The PTY WebSocket's framing (docs/api.md): a start frame first, then binary frames
// both ways; text frames for control.

export interface StartFrame {
  type: 'start';
  command: string[];
  env: Record<string, string>;
  cwd: string | null;
  rows: number;
  cols: number;
  term: string;
}

export type ServerFrame =
  | { type: 'started'; pid: number }
  | { type: 'exit'; code: number | null; signal: number | string | null }
  | { type: 'error'; message: string };

export function startFrame(rows: number, cols: number, command: string[] = []): string {
  const f: StartFrame = { type: 'start', command, env: {}, cwd: null, rows, cols, term: 'xterm-256color' };
  return JSON.stringify(f);
}

export function resizeFrame(rows: number, cols: number): string {
  return JSON.stringify({ type: 'resize', rows, cols });
}

export function parseServerFrame(text: string): ServerFrame | null {
  try {
    const v = JSON.parse(text) as { type?: unknown };
    if (v.type === 'started' || v.type === 'exit' || v.type === 'error') return v as ServerFrame;
  } catch {
    /* not a control frame */
  }
  return null;
}

/** The socket URL for a sandbox on this origin (ws: or wss: as the page). */
export function ptyUrl(sandbox: string, loc: { protocol: string; host: string } = window.location): string {
  const proto = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${loc.host}/api/v1/sandboxes/${encodeURIComponent(sandbox)}/pty`;
}
