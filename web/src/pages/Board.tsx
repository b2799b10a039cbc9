import { useEffect, useReducer, useState } from 'react';
import { api } from '../api/client';
import { stream } from '../api/events';
import type { TaskView } from '../api/types';
import { NewTask } from '../components/NewTask';
import { TaskCard } from '../components/TaskCard';
import { defaultLane, groupTasks, LANES, reduceTasks, type Lane, type TasksState } from '../lib/live';

type Action = { type: 'loaded'; tasks: TaskView[] } | { type: 'event'; e: Parameters<typeof reduceTasks>[1] };

function reducer(s: TasksState & { loaded: boolean }, a: Action) {
  if (a.type === 'loaded') return { tasks: a.tasks, stale: false, loaded: true };
  return { ...reduceTasks(s, a.e), loaded: s.loaded };
}

export function Board() {
  const [s, dispatch] = useReducer(reducer, { tasks: [], stale: true, loaded: false });
  const [error, setError] = useState<string | null>(null);
  const [showNew, setShowNew] = useState(false);
  const [picked, setTab] = useState<Lane | null>(null);

  // Events patch the board at once; a stale board is re-read (debounced).
  useEffect(() => stream.subscribe((e) => dispatch({ type: 'event', e })), []);
  useEffect(() => {
    if (!s.stale) return;
    const t = setTimeout(
      () => {
        api.GET('/api/v1/tasks').then(
          (r) => {
            if (r.data) {
              dispatch({ type: 'loaded', tasks: r.data });
              setError(null);
            } else setError('could not read the tasks');
          },
          (e: unknown) => setError(String(e)),
        );
      },
      s.loaded ? 200 : 0,
    );
    return () => clearTimeout(t);
  }, [s.stale, s.loaded, s.tasks]);

  const lanes = groupTasks(s.tasks);
  // On a phone one lane shows at a time: until one is picked, the first that has cards.
  const tab = picked ?? defaultLane(lanes);
  const main = LANES.filter((l) => l.id !== 'failed' && l.id !== 'cancelled');
  return (
    <section className="board-page">
      <div className="page-head">
        <h1>Tasks</h1>
        <button type="button" onClick={() => setShowNew((v) => !v)} aria-expanded={showNew}>
          {showNew ? 'Close' : 'New task'}
        </button>
      </div>
      {showNew && <NewTask onCreated={() => setShowNew(false)} />}
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <div className="tabs" role="tablist" aria-label="Columns">
        {main.map((l) => (
          <button
            key={l.id}
            type="button"
            role="tab"
            aria-selected={tab === l.id}
            className={tab === l.id ? 'tab active' : 'tab'}
            onClick={() => setTab(l.id)}
          >
            {l.title} <span className="count">{lanes[l.id].length}</span>
          </button>
        ))}
      </div>
      <div className="board">
        {main.map((l) => (
          <div key={l.id} className={tab === l.id ? 'lane current' : 'lane'} data-lane={l.id} aria-label={l.title} role="region">
            <h2>
              {l.title} <span className="count">{lanes[l.id].length}</span>
            </h2>
            {lanes[l.id].length === 0 && <p className="empty">{s.loaded ? 'Nothing here' : 'Loading…'}</p>}
            {lanes[l.id].map((t) => (
              <TaskCard key={t.id} task={t} />
            ))}
          </div>
        ))}
      </div>
      {(['failed', 'cancelled'] as const).map(
        (id) =>
          lanes[id].length > 0 && (
            <details key={id} className="lane-collapsed" data-lane={id}>
              <summary>
                {id === 'failed' ? 'Failed' : 'Cancelled'} <span className="count">{lanes[id].length}</span>
              </summary>
              <div className="grid-cards">
                {lanes[id].map((t) => (
                  <TaskCard key={t.id} task={t} />
                ))}
              </div>
            </details>
          ),
      )}
    </section>
  );
}
