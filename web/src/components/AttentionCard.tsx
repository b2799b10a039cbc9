import { useId, useState } from 'react';
import { answer } from '../api/actions';
import type { Answer, AttentionView } from '../api/types';
import { oneTap, permissionDetail, questions, replyAnswers } from '../lib/attention';
import { ago } from '../lib/format';
import { Link } from '../lib/router';

function useAnswer(item: string, onAnswered?: () => void) {
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<string | null>(null);
  const send = async (a: Answer) => {
    setBusy(true);
    setErr(null);
    try {
      await answer(item, a);
      onAnswered?.();
    } catch (e) {
      setErr(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(false);
    }
  };
  return { busy, err, send };
}

function Permission({ item, onAnswered }: { item: AttentionView; onAnswered?: () => void }) {
  const id = useId();
  const d = permissionDetail(item.detail);
  const [note, setNote] = useState('');
  const [showNote, setShowNote] = useState(false);
  const { busy, err, send } = useAnswer(item.id, onAnswered);
  return (
    <>
      <dl className="kv">
        <dt>Permission</dt>
        <dd className="mono">{d.permission}</dd>
        {d.patterns.length > 0 && (
          <>
            <dt>Patterns</dt>
            <dd className="mono">{d.patterns.join('  ')}</dd>
          </>
        )}
        {d.metadata.map(([k, v]) => (
          <FragmentKV key={k} k={k} v={v} />
        ))}
        {d.always.length > 0 && (
          <>
            <dt>“Always” allows</dt>
            <dd className="mono">{d.always.join('  ')}</dd>
          </>
        )}
      </dl>
      {d.diff && <pre className="code diff-snippet">{d.diff}</pre>}
      <div className="actions">
        <button type="button" disabled={busy} onClick={() => void send({ answer: 'once' })}>
          Allow once
        </button>
        <button type="button" disabled={busy} onClick={() => void send({ answer: 'always' })}>
          Always
        </button>
        {!showNote ? (
          <button type="button" className="danger" disabled={busy} onClick={() => setShowNote(true)}>
            Reject…
          </button>
        ) : null}
      </div>
      {showNote && (
        <div className="reject">
          <label htmlFor={`${id}-note`}>Note for the agent (optional)</label>
          <input id={`${id}-note`} value={note} onChange={(e) => setNote(e.target.value)} placeholder="use the pool instead" />
          <button type="button" className="danger" disabled={busy} onClick={() => void send({ answer: 'reject', message: note.trim() || null })}>
            Reject
          </button>
        </div>
      )}
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
    </>
  );
}

function FragmentKV({ k, v }: { k: string; v: string }) {
  return (
    <>
      <dt>{k}</dt>
      <dd className="mono">{v}</dd>
    </>
  );
}

function QuestionForm({ item, onAnswered }: { item: AttentionView; onAnswered?: () => void }) {
  const id = useId();
  const qs = questions(item.detail);
  const [picked, setPicked] = useState<string[][]>(qs.map(() => []));
  const [typed, setTyped] = useState<string[]>(qs.map(() => ''));
  const { busy, err, send } = useAnswer(item.id, onAnswered);
  const tap = oneTap(qs);
  const toggle = (qi: number, label: string, multiple: boolean) => {
    setPicked((p) =>
      p.map((cur, i) => {
        if (i !== qi) return cur;
        if (!multiple) return [label];
        return cur.includes(label) ? cur.filter((x) => x !== label) : [...cur, label];
      }),
    );
  };
  const answers = replyAnswers(qs, picked, typed);
  const ready = answers.every((a) => a.length > 0);
  return (
    <>
      {qs.map((q, qi) => (
        <fieldset key={qi} className="question">
          <legend>
            {q.header && <span className="chip">{q.header}</span>} {q.question}
          </legend>
          <div className="options">
            {q.options.map((o) => {
              const on = picked[qi]?.includes(o.label) ?? false;
              return (
                <button
                  key={o.label}
                  type="button"
                  className={on ? 'option on' : 'option'}
                  aria-pressed={on}
                  disabled={busy}
                  onClick={() => {
                    if (tap) void send({ answer: 'reply', answers: [[o.label]] });
                    else toggle(qi, o.label, q.multiple);
                  }}
                >
                  <strong>{o.label}</strong>
                  {o.description && <span className="small-text"> {o.description}</span>}
                </button>
              );
            })}
          </div>
          {q.custom && (
            <div className="field">
              <label htmlFor={`${id}-t${qi}`}>Or type an answer</label>
              <input
                id={`${id}-t${qi}`}
                value={typed[qi] ?? ''}
                onChange={(e) => setTyped((t) => t.map((x, i) => (i === qi ? e.target.value : x)))}
              />
            </div>
          )}
        </fieldset>
      ))}
      <div className="actions">
        {(!tap || typed.some((t) => t.trim())) && (
          <button type="button" disabled={busy || !ready} onClick={() => void send({ answer: 'reply', answers })}>
            Send answer
          </button>
        )}
        <button type="button" className="ghost" disabled={busy} onClick={() => void send({ answer: 'reject', message: null })}>
          Dismiss
        </button>
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
    </>
  );
}

function Stalled({ item, onAnswered }: { item: AttentionView; onAnswered?: () => void }) {
  const { busy, err, send } = useAnswer(item.id, onAnswered);
  return (
    <>
      <div className="actions">
        <button type="button" disabled={busy} onClick={() => void send({ answer: 'retry' })}>
          Retry the turn
        </button>
        <button type="button" className="danger" disabled={busy} onClick={() => void send({ answer: 'abort' })}>
          Abort
        </button>
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
    </>
  );
}

/**
 * A budget item (`budget` kind, being added on the server by another branch; not in
 * this branch's API document yet, hence the casts): continue, optionally with new
 * limits, or stop.
 */
function Budget({ item, onAnswered }: { item: AttentionView; onAnswered?: () => void }) {
  const id = useId();
  const d = (item.detail && typeof item.detail === 'object' ? item.detail : {}) as Record<string, unknown>;
  const n = (k: string) => (typeof d[k] === 'number' ? (d[k] as number) : null);
  const [usd, setUsd] = useState('');
  const [tok, setTok] = useState('');
  const { busy, err, send } = useAnswer(item.id, onAnswered);
  const cont = () => {
    void send({
      answer: 'continue',
      budget_usd: usd.trim() ? Number(usd) : null,
      budget_tokens: tok.trim() ? Number(tok) : null,
    });
  };
  return (
    <>
      <dl className="kv">
        <dt>Scope</dt>
        <dd>{String(d.scope ?? '')}</dd>
        {n('budget_usd') != null && (
          <>
            <dt>Cost</dt>
            <dd>
              ${(n('used_usd') ?? 0).toFixed(2)} of ${n('budget_usd')!.toFixed(2)}
            </dd>
          </>
        )}
        {n('budget_tokens') != null && (
          <>
            <dt>Tokens</dt>
            <dd>
              {n('used_tokens') ?? 0} of {n('budget_tokens')}
            </dd>
          </>
        )}
      </dl>
      <div className="row wrap">
        <div className="field">
          <label htmlFor={`${id}-usd`}>New cost limit, USD (optional)</label>
          <input id={`${id}-usd`} inputMode="decimal" value={usd} onChange={(e) => setUsd(e.target.value)} />
        </div>
        <div className="field">
          <label htmlFor={`${id}-tok`}>New token limit (optional)</label>
          <input id={`${id}-tok`} inputMode="numeric" value={tok} onChange={(e) => setTok(e.target.value)} />
        </div>
      </div>
      <div className="actions">
        <button type="button" disabled={busy} onClick={cont}>
          Continue
        </button>
        <button type="button" className="danger" disabled={busy} onClick={() => void send({ answer: 'stop' })}>
          Stop here
        </button>
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
    </>
  );
}

export function AttentionCard({ item, taskTitle, onAnswered }: { item: AttentionView; taskTitle?: string; onAnswered?: () => void }) {
  return (
    <article className={`card attention kind-${item.kind}`} data-testid="attention" data-kind={item.kind} data-item={item.id}>
      <header>
        <span className={`chip kind-${item.kind}`}>{item.kind}</span>
        <span className="small-text">{ago(item.created_at)}</span>
      </header>
      <h3 className="attn-title">{item.title}</h3>
      <p className="small-text">
        Task: <Link href={`/tasks/${item.task}`}>{taskTitle ?? item.task}</Link>
      </p>
      {item.status !== 'pending' ? (
        <p className="small-text">{item.status}</p>
      ) : item.kind === 'permission' ? (
        <Permission item={item} onAnswered={onAnswered} />
      ) : item.kind === 'question' ? (
        <QuestionForm item={item} onAnswered={onAnswered} />
      ) : item.kind === 'stalled' ? (
        <Stalled item={item} onAnswered={onAnswered} />
      ) : (item.kind as string) === 'budget' ? (
        <Budget item={item} onAnswered={onAnswered} />
      ) : (
        <p className="small-text">
          Answer this one with <code>atelier attention answer {item.id}</code>.
        </p>
      )}
    </article>
  );
}
