import { useEffect, useId, useState, type FormEvent } from 'react';
import { chain, check, say } from '../api/actions';
import { api, getText } from '../api/client';
import { loadConversation, type Conversation as Conv } from '../api/conversation';
import type { Effort, TaskDetail } from '../api/types';
import { AttentionCard } from '../components/AttentionCard';
import { DiffView } from '../components/DiffView';
import { ActionButtons, Progress, StateChip } from '../components/TaskCard';
import { Terminal } from '../components/Terminal';
import { ago, money, tokens } from '../lib/format';
import { useLive } from '../lib/hooks';
import { Link, navigate } from '../lib/router';

function Say({ id }: { id: string }) {
  const fid = useId();
  const [text, setText] = useState('');
  const [msg, setMsg] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (!text.trim()) return;
    setBusy(true);
    try {
      await say(id, text);
      setText('');
      setMsg('Sent (queued if the agent is busy).');
    } catch (ex) {
      setMsg(ex instanceof Error ? ex.message : String(ex));
    } finally {
      setBusy(false);
    }
  };
  return (
    <form onSubmit={(e) => void submit(e)} className="say">
      <label htmlFor={fid}>Tell the agent</label>
      <div className="row">
        <input id={fid} value={text} onChange={(e) => setText(e.target.value)} placeholder="also cover the admin path" />
        <button type="submit" disabled={busy || !text.trim()}>
          Say
        </button>
      </div>
      {msg && <p className="small-text" role="status">{msg}</p>}
    </form>
  );
}

function Chain({ id }: { id: string }) {
  const fid = useId();
  const templates = useLive(async () => (await api.GET('/api/v1/templates')).data ?? [], () => false, []);
  const [template, setTemplate] = useState('security-review');
  const [desc, setDesc] = useState('');
  const [effort, setEffort] = useState<Effort | ''>('');
  const [err, setErr] = useState<string | null>(null);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setErr(null);
    try {
      const t = await chain(id, { template, description: desc.trim() || null, effort: effort || null, start: true });
      navigate(`/tasks/${t.id}`);
    } catch (ex) {
      setErr(ex instanceof Error ? ex.message : String(ex));
    }
  };
  return (
    <form onSubmit={(e) => void submit(e)} className="card chain">
      <h3>Chain a follow-up on this branch</h3>
      <div className="row wrap">
        <div className="field">
          <label htmlFor={`${fid}-t`}>Template</label>
          <select id={`${fid}-t`} value={template} onChange={(e) => setTemplate(e.target.value)}>
            {(templates.data ?? []).map((t) => (
              <option key={t.name} value={t.name}>
                {t.name}
              </option>
            ))}
          </select>
        </div>
        <div className="field">
          <label htmlFor={`${fid}-e`}>Effort</label>
          <select id={`${fid}-e`} value={effort} onChange={(e) => setEffort(e.target.value as Effort | '')}>
            <option value="">template default</option>
            {(['low', 'medium', 'high', 'max'] as const).map((x) => (
              <option key={x}>{x}</option>
            ))}
          </select>
        </div>
      </div>
      <div className="field">
        <label htmlFor={`${fid}-d`}>What to do (optional)</label>
        <input id={`${fid}-d`} value={desc} onChange={(e) => setDesc(e.target.value)} />
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
      <button type="submit">Chain and start</button>
    </form>
  );
}

function Conversation({ id, summary, stamp }: { id: string; summary: string | null | undefined; stamp: number }) {
  const [conv, setConv] = useState<Conv | null | undefined>(undefined);
  useEffect(() => {
    let live = true;
    loadConversation(id).then(
      (c) => live && setConv(c),
      () => live && setConv(null),
    );
    return () => {
      live = false;
    };
  }, [id, stamp]);
  if (!conv) {
    return summary ? (
      <div className="summary" data-testid="summary">
        <h3>Agent’s last message</h3>
        <p className="prewrap">{summary}</p>
      </div>
    ) : (
      <p className="empty">{conv === undefined ? 'Loading…' : 'No message from the agent yet.'}</p>
    );
  }
  return (
    <div data-testid="conversation">
      <p className="small-text">
        {conv.live ? 'Live from the agent.' : conv.captured_at ? `As kept ${ago(conv.captured_at)}.` : ''}
        {conv.truncated ? ' Older messages are not shown.' : ''}
      </p>
      {conv.messages.length === 0 && <p className="empty">No messages yet.</p>}
      <ol className="conversation">
        {conv.messages.map((m) => (
          <li key={m.id} className={`msg role-${m.role}`}>
            <div className="row between">
              <span className="chip">{m.role === 'user' ? 'you' : 'agent'}</span>
              {m.role === 'assistant' && (m.tokens_in != null || m.cost != null) && (
                <span className="small-text">
                  {m.tokens_in != null && `${tokens(m.tokens_in)} in · ${tokens(m.tokens_out ?? 0)} out`}
                  {m.cost ? ` · ${money(m.cost)}` : ''}
                </span>
              )}
            </div>
            {m.text && <p className="prewrap">{m.text}</p>}
            {m.tools.map((t) => (
              <details key={t.call_id} className="tool">
                <summary>
                  <span className="mono">{t.tool}</span> {t.title ?? t.input} <span className={`chip tool-${t.status}`}>{t.status}</span>
                </summary>
                {t.input && <pre className="code">{t.input}</pre>}
                {t.output && (
                  <pre className="code">
                    {t.output}
                    {t.output_truncated ? '\n…' : ''}
                  </pre>
                )}
              </details>
            ))}
            {m.error && <p className="error">{m.error}</p>}
          </li>
        ))}
      </ol>
      {summary && conv.messages.length === 0 && <p className="prewrap">{summary}</p>}
    </div>
  );
}

function Previews({ sandbox }: { sandbox: string }) {
  const sb = useLive(
    async () => check(await api.GET('/api/v1/sandboxes/{id}', { params: { path: { id: sandbox } } })),
    (e) => 'sandbox' in e && e.sandbox === sandbox,
    [sandbox],
  );
  const dev = useLive(
    async () => (await api.GET('/api/v1/sandboxes/{id}/dev', { params: { path: { id: sandbox } } })).data ?? [],
    (e) => e.type === 'dev.state' && e.sandbox === sandbox,
    [sandbox],
  );
  const urls: { name: string; url: string }[] = [];
  if (sb.data?.url) urls.push({ name: 'sandbox', url: sb.data.url });
  for (const d of dev.data ?? []) if (d.url) urls.push({ name: d.name, url: d.url });
  if (urls.length === 0) return null;
  return (
    <ul className="links">
      {urls.map((u) => (
        <li key={u.url}>
          <a href={u.url} target="_blank" rel="noreferrer noopener">
            {u.name}: {u.url}
          </a>
        </li>
      ))}
    </ul>
  );
}

export function TaskPage({ id }: { id: string }) {
  const task = useLive<TaskDetail>(
    async () => check(await api.GET('/api/v1/tasks/{id}', { params: { path: { id } } })),
    (e) => e.type === 'resync' || ((e.type === 'task.changed' || e.type === 'attention.changed') && e.task === id),
    [id],
  );
  const t = task.data;
  const stamp = t?.updated_at ?? 0;
  const [diff, setDiff] = useState<string | null>(null);
  const [diffErr, setDiffErr] = useState<string | null>(null);
  const [tab, setTab] = useState<'diff' | 'conversation' | 'terminal'>('diff');
  useEffect(() => {
    if (!t || t.state === 'backlog') return;
    let live = true;
    getText(`/api/v1/tasks/${encodeURIComponent(id)}/diff`).then(
      (d) => {
        if (live) {
          setDiff(d);
          setDiffErr(null);
        }
      },
      (e: unknown) => live && setDiffErr(e instanceof Error ? e.message : String(e)),
    );
    return () => {
      live = false;
    };
    // The diff follows the files the agent touched.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [id, t?.state, t?.files.length, stamp]);

  if (task.error) {
    return (
      <section>
        <p className="error" role="alert">
          {task.error}
        </p>
        <Link href="/">Back to the tasks</Link>
      </section>
    );
  }
  if (!t) return <p className="empty">Loading…</p>;
  return (
    <section className="task-page" data-testid="task-page" data-state={t.state}>
      <p className="crumbs">
        <Link href="/">Tasks</Link> / <span className="mono">{t.id}</span>
      </p>
      <div className="page-head">
        <h1>{t.title}</h1>
        <StateChip state={t.state} parked={t.parked} />
      </div>
      <ActionButtons task={t} onDone={task.reload} />
      {t.error && <p className="error">{t.error}</p>}
      <div className="task-grid">
        <div className="task-main">
          {t.attention.length > 0 && (
            <div className="grid-cards">
              {t.attention.map((a) => (
                <AttentionCard key={a.id} item={a} taskTitle={t.title} onAnswered={task.reload} />
              ))}
            </div>
          )}
          <div className="tabs static" role="tablist" aria-label="Task detail">
            {(['diff', 'conversation', 'terminal'] as const).map((x) => (
              <button key={x} type="button" role="tab" aria-selected={tab === x} className={tab === x ? 'tab active' : 'tab'} onClick={() => setTab(x)}>
                {x === 'diff' ? `Diff (${t.files.length})` : x === 'conversation' ? 'Conversation' : 'Terminal'}
              </button>
            ))}
          </div>
          {tab === 'diff' && (
            <div role="tabpanel" data-testid="diff">
              {diffErr && <p className="error">{diffErr}</p>}
              {diff === null && !diffErr ? <p className="empty">{t.state === 'backlog' ? 'Not started.' : 'Loading…'}</p> : <DiffView text={diff ?? ''} />}
            </div>
          )}
          {tab === 'conversation' && (
            <div role="tabpanel">
              <Conversation id={t.id} summary={t.summary} stamp={stamp} />
            </div>
          )}
          {tab === 'terminal' && (
            <div role="tabpanel">
              {t.sandbox ? <Terminal sandbox={t.sandbox} /> : <p className="empty">The task has no sandbox now.</p>}
            </div>
          )}
          {['working', 'waiting', 'review', 'queued', 'starting'].includes(t.state) && <Say id={t.id} />}
          {t.state === 'done' && <Chain id={t.id} />}
        </div>
        <aside className="task-side card">
          <dl className="kv">
            <dt>Branch</dt>
            <dd className="mono">{t.branch}</dd>
            <dt>From</dt>
            <dd className="mono">{t.base_branch}</dd>
            <dt>Workspace</dt>
            <dd>{t.workspace}</dd>
            <dt>Template</dt>
            <dd>
              {t.template} · {t.effort}
            </dd>
            <dt>Cost</dt>
            <dd data-testid="cost">{money(t.cost)}</dd>
            <dt>Tokens</dt>
            <dd>
              {tokens(t.tokens_in)} in · {tokens(t.tokens_out)} out · {t.messages} messages
            </dd>
            {t.sandbox && (
              <>
                <dt>Sandbox</dt>
                <dd>
                  <Link href={`/sandboxes/${t.sandbox}`} className="mono">
                    {t.sandbox}
                  </Link>
                </dd>
              </>
            )}
            {t.parent && (
              <>
                <dt>Chained from</dt>
                <dd>
                  <Link href={`/tasks/${t.parent}`} className="mono">
                    {t.parent}
                  </Link>
                </dd>
              </>
            )}
            <dt>Updated</dt>
            <dd>{ago(t.updated_at)}</dd>
            {t.queued_messages > 0 && (
              <>
                <dt>Queued messages</dt>
                <dd>{t.queued_messages}</dd>
              </>
            )}
          </dl>
          <Progress done={t.todos_done} total={t.todos_total} percent={t.percent} />
          {t.todos.length > 0 && (
            <ul className="todos" aria-label="Todos">
              {t.todos.map((td, i) => (
                <li key={i} className={`todo todo-${td.status}`}>
                  <span aria-hidden="true">{td.status === 'completed' ? '✔' : td.status === 'in_progress' ? '▶' : td.status === 'cancelled' ? '✕' : '○'}</span> {td.content}
                </li>
              ))}
            </ul>
          )}
          {t.files.length > 0 && (
            <>
              <h3>Files touched</h3>
              <ul className="files mono">
                {t.files.map((f) => (
                  <li key={f}>{f}</li>
                ))}
              </ul>
            </>
          )}
          {t.commits.length > 0 && (
            <>
              <h3>Commits</h3>
              <ul className="files">
                {t.commits.map((c) => (
                  <li key={c.id}>
                    <span className="mono">{c.id.slice(0, 8)}</span> {c.subject}
                  </li>
                ))}
              </ul>
            </>
          )}
          {t.sandbox && <Previews sandbox={t.sandbox} />}
        </aside>
      </div>
    </section>
  );
}
