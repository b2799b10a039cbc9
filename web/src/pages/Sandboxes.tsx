import { useEffect, useState } from 'react';
import { check, startDev, stopDev } from '../api/actions';
import { api, getText } from '../api/client';
import { streamText } from '../api/raw';
import type { SandboxView } from '../api/types';
import { NewDev, NewSandbox } from '../components/NewSandbox';
import { Terminal } from '../components/Terminal';
import { bytes, duration } from '../lib/format';
import { useLive } from '../lib/hooks';
import { Link, navigate } from '../lib/router';

function uptime(s: SandboxView): string {
  if (s.state !== 'running') return '—';
  return duration(Date.now() - Date.parse(s.updated_at));
}

export function Sandboxes() {
  const list = useLive(
    async () => check(await api.GET('/api/v1/sandboxes')),
    (e) => e.type.startsWith('sandbox') || e.type === 'resync',
    [],
  );
  const [showNew, setShowNew] = useState(false);
  const sources = useLive(
    async () => ({
      workspaces: ((await api.GET('/api/v1/workspaces')).data ?? []).map((w) => w.name),
      images: ((await api.GET('/api/v1/images')).data ?? []).map((i) => i.name),
    }),
    (e) => e.type === 'workspace.changed',
    [],
  );
  return (
    <section>
      <div className="page-head">
        <h1>Sandboxes</h1>
        <button type="button" aria-expanded={showNew} onClick={() => setShowNew((x) => !x)}>
          {showNew ? 'Close' : 'New sandbox'}
        </button>
      </div>
      {showNew && sources.data && (
        <NewSandbox workspaces={sources.data.workspaces} images={sources.data.images} onCreated={(id) => navigate(`/sandboxes/${id}`)} />
      )}
      {list.error && <p className="error">{list.error}</p>}
      {list.data && list.data.length === 0 && <p className="empty">No sandboxes.</p>}
      <div className="table-wrap">
        <table className="list cards">
          <thead>
            <tr>
              <th>Name</th>
              <th>State</th>
              <th>vCPUs / memory</th>
              <th>Uptime</th>
              <th>Image</th>
            </tr>
          </thead>
          <tbody>
            {(list.data ?? []).map((s) => (
              <tr key={s.id} data-testid="sandbox-row">
                <td>
                  <Link href={`/sandboxes/${s.id}`}>{s.name}</Link>
                  <div className="small-text mono">{s.id}</div>
                </td>
                <td data-label="State">
                  <span className={`chip sb-${s.state}`}>{s.state}</span>
                  {s.operation && <span className="small-text"> {s.operation}…</span>}
                </td>
                <td data-label="Resources">
                  {s.vcpus} vCPU / {s.memory_mib} MiB
                </td>
                <td data-label="Uptime">{uptime(s)}</td>
                <td data-label="Image" className="mono small-text">
                  {s.image}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </section>
  );
}

/** A dev command's output, followed live while shown. */
function DevLogs({ sandbox, name }: { sandbox: string; name: string }) {
  const [text, setText] = useState('');
  const [err, setErr] = useState<string | null>(null);
  useEffect(() => {
    const ac = new AbortController();
    const path = `/api/v1/sandboxes/${encodeURIComponent(sandbox)}/dev/${encodeURIComponent(name)}/logs?follow=true&tail=200`;
    streamText(path, setText, ac.signal).catch((e: unknown) => {
      if (!ac.signal.aborted) setErr(e instanceof Error ? e.message : String(e));
    });
    return () => ac.abort();
  }, [sandbox, name]);
  return (
    <>
      {err && <p className="error">{err}</p>}
      <pre className="code log" tabIndex={0} data-testid="dev-log">
        {text || '(no output yet)'}
      </pre>
    </>
  );
}

/** The guest agent's metrics sample, the figures a person reads. */
function Metrics({ m }: { m: unknown }) {
  const o = (m && typeof m === 'object' ? m : {}) as Record<string, unknown>;
  const n = (k: string) => (typeof o[k] === 'number' ? (o[k] as number) : null);
  const memTotal = n('mem_total_bytes');
  const memAvail = n('mem_available_bytes');
  const diskTotal = n('disk_total_bytes');
  const diskFree = n('disk_free_bytes');
  const load = Array.isArray(o.load_avg) ? (o.load_avg as number[]) : null;
  const up = n('uptime_secs');
  return (
    <>
      <h3>Metrics</h3>
      <dl className="metrics" data-testid="metrics">
        {n('cpu_count') != null && (
          <>
            <dt>CPUs</dt>
            <dd>{n('cpu_count')}</dd>
          </>
        )}
        {load && (
          <>
            <dt>Load</dt>
            <dd>{load.map((x) => x.toFixed(2)).join(' ')}</dd>
          </>
        )}
        {memTotal != null && memAvail != null && (
          <>
            <dt>Memory</dt>
            <dd>
              {bytes(memTotal - memAvail)} of {bytes(memTotal)}
            </dd>
          </>
        )}
        {diskTotal != null && diskFree != null && (
          <>
            <dt>Disk</dt>
            <dd>
              {bytes(diskTotal - diskFree)} of {bytes(diskTotal)}
            </dd>
          </>
        )}
        {up != null && (
          <>
            <dt>Guest uptime</dt>
            <dd>{duration(up * 1000)}</dd>
          </>
        )}
      </dl>
    </>
  );
}

type Op = 'stop' | 'start' | 'pause' | 'resume' | 'fork' | 'delete';

async function runOp(id: string, op: Op, forkName?: string) {
  const p = { params: { path: { id } } };
  switch (op) {
    case 'stop':
      return check(await api.POST('/api/v1/sandboxes/{id}/stop', p));
    case 'start':
      return check(await api.POST('/api/v1/sandboxes/{id}/start', p));
    case 'pause':
      return check(await api.POST('/api/v1/sandboxes/{id}/pause', p));
    case 'resume':
      return check(await api.POST('/api/v1/sandboxes/{id}/resume', p));
    case 'fork':
      return check(await api.POST('/api/v1/sandboxes/{id}/fork', { ...p, body: { name: forkName ?? '' } }));
    case 'delete':
      return check(await api.DELETE('/api/v1/sandboxes/{id}', p));
  }
}

export function SandboxPage({ id }: { id: string }) {
  const sb = useLive(
    async () => check(await api.GET('/api/v1/sandboxes/{id}', { params: { path: { id } } })),
    (e) => e.type === 'resync' || ('sandbox' in e && e.sandbox === id),
    [id],
  );
  const dev = useLive(
    async () => (await api.GET('/api/v1/sandboxes/{id}/dev', { params: { path: { id } } })).data ?? [],
    (e) => e.type === 'dev.state' && e.sandbox === id,
    [id],
  );
  const [log, setLog] = useState<string>('');
  const [metrics, setMetrics] = useState<unknown>(null);
  const [err, setErr] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [logsOf, setLogsOf] = useState<string | null>(null);
  const s = sb.data;
  const running = s?.state === 'running';
  useEffect(() => {
    if (!s) return;
    getText(`/api/v1/sandboxes/${encodeURIComponent(id)}/logs?tail_bytes=16384`).then(setLog, () => setLog(''));
    if (running) {
      api.GET('/api/v1/sandboxes/{id}/metrics', { params: { path: { id } } }).then(
        (r) => setMetrics(r.data ?? null),
        () => setMetrics(null),
      );
    }
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [id, s?.state]);

  const op = async (o: Op) => {
    let forkName: string | undefined;
    if (o === 'fork') {
      const n = window.prompt('Name of the fork (lowercase letters, digits, -)');
      if (!n) return;
      forkName = n;
    } else if ((o === 'delete' || o === 'stop') && !window.confirm(`${o === 'delete' ? 'Delete' : 'Stop'} ${s?.name ?? id}?`)) return;
    setBusy(true);
    setErr(null);
    try {
      const r = await runOp(id, o, forkName);
      if (o === 'delete') navigate('/sandboxes');
      else if (o === 'fork' && r && typeof r === 'object' && 'id' in r) navigate(`/sandboxes/${String(r.id)}`);
      else sb.reload();
    } catch (e) {
      setErr(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(false);
    }
  };

  const stop = async (name: string) => {
    if (!window.confirm(`Stop ${name}?`)) return;
    setErr(null);
    try {
      await stopDev(id, name);
      dev.reload();
    } catch (e) {
      setErr(e instanceof Error ? e.message : String(e));
    }
  };

  if (sb.error)
    return (
      <section>
        <p className="error">{sb.error}</p>
        <Link href="/sandboxes">Back</Link>
      </section>
    );
  if (!s) return <p className="empty">Loading…</p>;
  const ops: Op[] =
    s.state === 'running' ? ['stop', 'pause', 'fork', 'delete'] : s.state === 'paused' ? ['resume', 'stop', 'delete'] : s.state === 'stopped' || s.state === 'failed' ? ['start', 'delete'] : [];
  return (
    <section>
      <p className="crumbs">
        <Link href="/sandboxes">Sandboxes</Link> / <span className="mono">{s.id}</span>
      </p>
      <div className="page-head">
        <h1>{s.name}</h1>
        <span className={`chip sb-${s.state}`}>{s.state}</span>
      </div>
      <div className="actions">
        {ops.map((o) => (
          <button key={o} type="button" className={o === 'delete' ? 'small danger' : 'small'} disabled={busy} onClick={() => void op(o)}>
            {o[0]!.toUpperCase() + o.slice(1)}
          </button>
        ))}
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
      {s.error && <p className="error">{s.error}</p>}
      <div className="task-grid">
        <div className="task-main">
          {running && (
            <>
              <h2>Terminal</h2>
              <Terminal sandbox={s.id} />
            </>
          )}
          <h2>Dev commands</h2>
          {(dev.data ?? []).length === 0 ? (
            <p className="empty">None running.</p>
          ) : (
            <ul className="links">
              {(dev.data ?? []).map((d) => (
                <li key={d.name}>
                  <strong>{d.name}</strong> <span className="mono small-text">{d.command}</span> <span className="chip">{d.listening ? 'listening' : d.state}</span>{' '}
                  {d.url && (
                    <a href={d.url} target="_blank" rel="noreferrer noopener">
                      {d.url}
                    </a>
                  )}{' '}
                  <button type="button" className="small ghost" aria-expanded={logsOf === d.name} onClick={() => setLogsOf((x) => (x === d.name ? null : d.name))}>
                    {logsOf === d.name ? 'Hide logs' : 'Logs'}
                  </button>{' '}
                  <button type="button" className="small ghost" disabled={busy} onClick={() => void stop(d.name)}>
                    Stop
                  </button>
                  {logsOf === d.name && <DevLogs sandbox={s.id} name={d.name} />}
                </li>
              ))}
            </ul>
          )}
          {running && (
            <NewDev
              onStart={async (body) => {
                await startDev(s.id, body);
                dev.reload();
              }}
            />
          )}
          <h2>Console log</h2>
          <pre className="code log" tabIndex={0}>
            {log || '(empty)'}
          </pre>
        </div>
        <aside className="task-side card">
          <dl className="kv">
            <dt>Image</dt>
            <dd className="mono">{s.image}</dd>
            <dt>Resources</dt>
            <dd>
              {s.vcpus} vCPU · {s.memory_mib} MiB
            </dd>
            <dt>Uptime</dt>
            <dd>{uptime(s)}</dd>
            {s.boot_ms != null && (
              <>
                <dt>Last boot</dt>
                <dd>
                  {s.boot_ms} ms ({s.booted_from ?? 'boot'})
                </dd>
              </>
            )}
            <dt>Egress</dt>
            <dd>{s.egress}</dd>
            {s.ip && (
              <>
                <dt>Address</dt>
                <dd className="mono">{s.ip}</dd>
              </>
            )}
            {s.url && (
              <>
                <dt>URL</dt>
                <dd>
                  <a href={s.url} target="_blank" rel="noreferrer noopener">
                    {s.url}
                  </a>
                </dd>
              </>
            )}
            {s.agent && (
              <>
                <dt>Agent</dt>
                <dd>
                  {s.agent}
                  {s.agent_detail ? ` · ${s.agent_detail}` : ''}
                </dd>
              </>
            )}
          </dl>
          {metrics != null && <Metrics m={metrics} />}
        </aside>
      </div>
    </section>
  );
}
