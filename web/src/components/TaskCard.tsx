import { useState } from 'react';
import { taskAction, type TaskAction } from '../api/actions';
import type { TaskView } from '../api/types';
import { money } from '../lib/format';
import { Link } from '../lib/router';

/** Which actions a task's state allows (what the server accepts). */
export function actionsFor(t: Pick<TaskView, 'state'>): TaskAction[] {
  switch (t.state) {
    case 'backlog':
      return ['start', 'cancel'];
    case 'queued':
    case 'starting':
    case 'working':
    case 'waiting':
      return ['cancel'];
    case 'review':
      return ['done', 'cancel'];
    case 'failed':
    case 'cancelled':
      return ['retry'];
    default:
      return [];
  }
}

const LABEL: Record<TaskAction, string> = { start: 'Start', cancel: 'Cancel', retry: 'Retry', done: 'Done' };

export function Progress({ done, total, percent }: { done: number; total: number; percent: number }) {
  if (total === 0) return null;
  return (
    <div className="progress" role="progressbar" aria-valuemin={0} aria-valuemax={100} aria-valuenow={percent} aria-label={`Todos ${done} of ${total}`}>
      <div className="bar" style={{ width: `${percent}%` }} />
      <span className="progress-text">
        {done}/{total} · {percent}%
      </span>
    </div>
  );
}

export function StateChip({ state, parked }: { state: string; parked?: boolean }) {
  return (
    <span className={`chip state-${state}`} data-testid="state">
      {state}
      {parked ? ' · parked' : ''}
    </span>
  );
}

export function ActionButtons({ task, onDone }: { task: TaskView; onDone?: () => void }) {
  const [busy, setBusy] = useState<TaskAction | null>(null);
  const [err, setErr] = useState<string | null>(null);
  const run = async (a: TaskAction) => {
    if (a === 'cancel' && !window.confirm(`Cancel “${task.title}”?`)) return;
    setBusy(a);
    setErr(null);
    try {
      await taskAction(task.id, a);
      onDone?.();
    } catch (e) {
      setErr(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(null);
    }
  };
  const acts = actionsFor(task);
  if (acts.length === 0) return null;
  return (
    <div className="actions">
      {acts.map((a) => (
        <button key={a} type="button" className={a === 'cancel' ? 'small ghost' : 'small'} disabled={busy !== null} onClick={() => void run(a)}>
          {busy === a ? '…' : LABEL[a]}
        </button>
      ))}
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
    </div>
  );
}

export function TaskCard({ task }: { task: TaskView }) {
  return (
    <article className="card task-card" data-testid="task-card" data-task={task.id} data-state={task.state}>
      <header>
        <Link href={`/tasks/${task.id}`} className="card-title">
          {task.title}
        </Link>
        {task.pending > 0 && (
          <Link href="/needs" className="badge attn" aria-label={`${task.pending} waiting for you`}>
            {task.pending} ⚑
          </Link>
        )}
      </header>
      <div className="meta">
        <StateChip state={task.state} parked={task.parked} />
        {task.state === 'queued' && task.queue_position != null && <span className="chip">#{task.queue_position} in queue</span>}
        <span className="mono branch" title={task.branch}>
          {task.branch}
        </span>
      </div>
      <Progress done={task.todos_done} total={task.todos_total} percent={task.percent} />
      <div className="meta small-text">
        <span>{task.workspace}</span>
        <span>
          {task.files.length} file{task.files.length === 1 ? '' : 's'}
        </span>
        <span>{money(task.cost)}</span>
      </div>
      {task.error && task.state === 'failed' && <p className="error small-text">{task.error}</p>}
      <ActionButtons task={task} />
    </article>
  );
}
