import { useEffect, useId, useState, type FormEvent } from 'react';
import { check } from '../api/actions';
import { api, getText } from '../api/client';
import { putRaw } from '../api/raw';
import type { PrebuildView } from '../api/types';
import { WorkspaceEditor, type SaveError } from '../components/WorkspaceEditor';
import type { WorkspaceSpec } from '../lib/workspaceForm';
import { ago, bytes } from '../lib/format';
import { useEvents, useLive } from '../lib/hooks';
import { Link } from '../lib/router';

export function Workspaces() {
  const list = useLive(
    async () => check(await api.GET('/api/v1/workspaces')),
    (e) => e.type === 'workspace.changed' || e.type === 'resync',
    [],
  );
  const pbs = useLive(
    async () => check(await api.GET('/api/v1/prebuilds')),
    (e) => e.type === 'prebuild.status' || e.type === 'resync',
    [],
  );
  const latest = (ws: string) => (pbs.data ?? []).filter((p) => p.workspace === ws).sort((a, b) => b.created_at - a.created_at)[0];
  return (
    <section>
      <div className="page-head">
        <h1>Workspaces</h1>
      </div>
      {list.error && <p className="error">{list.error}</p>}
      {list.data && list.data.length === 0 && (
        <p className="empty">
          No workspaces yet: <code>atelier workspace apply -f shop.yaml</code>
        </p>
      )}
      <div className="grid-cards">
        {(list.data ?? []).map((w) => {
          const p = latest(w.name);
          return (
            <article key={w.name} className="card" data-testid="workspace-card">
              <header>
                <Link href={`/workspaces/${w.name}`} className="card-title">
                  {w.name}
                </Link>
                <span className="small-text">rev {w.revision}</span>
              </header>
              <p className="small-text">
                Prebuild: {p ? <span className={`chip pb-${p.status}`}>{p.status}</span> : 'none'} {p && ago(p.created_at)}
              </p>
            </article>
          );
        })}
      </div>
      <Secrets />
    </section>
  );
}

function Secrets() {
  const id = useId();
  const list = useLive(async () => check(await api.GET('/api/v1/secrets')), () => false, []);
  const [name, setName] = useState('');
  const [value, setValue] = useState('');
  const [msg, setMsg] = useState<string | null>(null);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (!/^[a-z0-9][a-z0-9._-]{0,63}$/.test(name)) {
      setMsg('name: lowercase letters, digits, . _ -, up to 64 characters');
      return;
    }
    try {
      await putRaw(`/api/v1/secrets/${encodeURIComponent(name)}`, value);
      setMsg(`Set ${name}.`);
      setValue('');
      list.reload();
    } catch (ex) {
      setMsg(ex instanceof Error ? ex.message : String(ex));
    }
  };
  return (
    <div className="card secrets">
      <h2>Secrets</h2>
      <p className="small-text">Values are write-only: they are never shown again.</p>
      <ul className="files">
        {(list.data ?? []).map((s) => (
          <li key={s.name}>
            <span className="mono">{s.name}</span> <span className="small-text">set {s.updated_at}</span>
          </li>
        ))}
      </ul>
      <form onSubmit={(e) => void submit(e)} className="row wrap">
        <div className="field">
          <label htmlFor={`${id}-n`}>Name</label>
          <input id={`${id}-n`} value={name} onChange={(e) => setName(e.target.value)} autoComplete="off" />
        </div>
        <div className="field">
          <label htmlFor={`${id}-v`}>Value</label>
          <input id={`${id}-v`} type="password" value={value} onChange={(e) => setValue(e.target.value)} autoComplete="new-password" />
        </div>
        <button type="submit" disabled={!name || !value}>
          Set secret
        </button>
      </form>
      {msg && <p role="status" className="small-text">{msg}</p>}
    </div>
  );
}

function PrebuildLog({ pb }: { pb: PrebuildView }) {
  const [lines, setLines] = useState<string[]>([]);
  useEffect(() => {
    let live = true;
    getText(`/api/v1/prebuilds/${encodeURIComponent(pb.id)}/logs`).then(
      (t) => live && setLines(t.split('\n')),
      () => live && setLines([]),
    );
    return () => {
      live = false;
    };
  }, [pb.id]);
  // While it builds, new lines arrive as prebuild.log events.
  useEvents((e) => {
    if (e.type === 'prebuild.log' && e.prebuild === pb.id) setLines((l) => [...l.slice(-2000), e.line]);
  });
  return (
    <pre className="code log" tabIndex={0} data-testid="prebuild-log">
      {lines.join('\n') || '(no output yet)'}
    </pre>
  );
}

export function WorkspacePage({ name }: { name: string }) {
  const ws = useLive(
    async () => check(await api.GET('/api/v1/workspaces/{name}', { params: { path: { name } } })),
    (e) => e.type === 'resync' || (e.type === 'workspace.changed' && e.workspace === name),
    [name],
  );
  const pbs = useLive(
    async () => check(await api.GET('/api/v1/prebuilds', { params: { query: { workspace: name } } })),
    (e) => e.type === 'resync' || (e.type === 'prebuild.status' && e.workspace === name),
    [name],
  );
  const [open, setOpen] = useState<string | null>(null);
  const [editing, setEditing] = useState(false);
  const save = async (spec: WorkspaceSpec): Promise<SaveError | null> => {
    const r = await api.PUT('/api/v1/workspaces/{name}', { params: { path: { name } }, body: spec });
    if (r.error) return { message: r.error.message, field: r.error.field };
    if (!r.response.ok) return { message: `${r.response.status} ${r.response.statusText}` };
    return null;
  };
  const [err, setErr] = useState<string | null>(null);
  const trigger = async () => {
    setErr(null);
    try {
      const r = await api.POST('/api/v1/workspaces/{name}/prebuilds', { params: { path: { name } } });
      const pb = check(r) as PrebuildView | undefined;
      if (pb && typeof pb === 'object' && 'id' in pb) setOpen(pb.id);
      pbs.reload();
    } catch (e) {
      setErr(e instanceof Error ? e.message : String(e));
    }
  };
  if (ws.error)
    return (
      <section>
        <p className="error">{ws.error}</p>
        <Link href="/workspaces">Back</Link>
      </section>
    );
  const list = [...(pbs.data ?? [])].sort((a, b) => b.created_at - a.created_at);
  const shown = list.find((p) => p.id === open) ?? list[0];
  return (
    <section>
      <p className="crumbs">
        <Link href="/workspaces">Workspaces</Link> / {name}
      </p>
      <div className="page-head">
        <h1>{name}</h1>
        <button type="button" onClick={() => void trigger()}>
          Build a prebuild
        </button>
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
      {ws.data && editing && (
        <WorkspaceEditor
          spec={ws.data.spec}
          save={save}
          onCancel={() => setEditing(false)}
          onSaved={() => {
            setEditing(false);
            ws.reload();
          }}
        />
      )}
      <div className="task-grid">
        <div className="task-main">
          <h2>Prebuilds</h2>
          <div className="table-wrap">
            <table className="list cards">
              <thead>
                <tr>
                  <th>Id</th>
                  <th>Status</th>
                  <th>Rev</th>
                  <th>Started</th>
                  <th>Size</th>
                </tr>
              </thead>
              <tbody>
                {list.map((p) => (
                  <tr key={p.id}>
                    <td>
                      <button type="button" className="linkish mono" onClick={() => setOpen(p.id)} aria-pressed={shown?.id === p.id}>
                        {p.id}
                      </button>
                    </td>
                    <td data-label="Status">
                      <span className={`chip pb-${p.status}`}>{p.status}</span>
                      {p.status === 'stale' && <span className="small-text"> (rebuild: the workspace or a repo moved on)</span>}
                    </td>
                    <td data-label="Revision">{p.revision}</td>
                    <td data-label="Started">{ago(p.created_at)}</td>
                    <td data-label="Size">{p.size_bytes != null ? bytes(p.size_bytes) : '—'}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          {shown && (
            <>
              <h3>
                Log of <span className="mono">{shown.id}</span>
              </h3>
              {shown.error && <p className="error">{shown.error}</p>}
              <PrebuildLog key={shown.id} pb={shown} />
            </>
          )}
        </div>
        <aside className="task-side card">
          <div className="row between">
            <h2>Definition</h2>
            {ws.data && !editing && (
              <button type="button" className="small" onClick={() => setEditing(true)}>
                Edit
              </button>
            )}
          </div>
          {ws.data ? (
            <>
              <p className="small-text">
                Revision {ws.data.revision}, changed {ws.data.updated_at}
              </p>
              <pre className="code small-text">{JSON.stringify(ws.data.spec, null, 2)}</pre>
            </>
          ) : (
            <p className="empty">Loading…</p>
          )}
        </aside>
      </div>
    </section>
  );
}
