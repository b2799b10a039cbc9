import { api } from '../api/client';
import { AttentionCard } from '../components/AttentionCard';
import { useLive } from '../lib/hooks';

export function NeedsYou() {
  const items = useLive(
    async () => (await api.GET('/api/v1/attention')).data ?? [],
    (e) => e.type === 'attention.changed' || e.type === 'resync',
    [],
  );
  const tasks = useLive(
    async () => (await api.GET('/api/v1/tasks')).data ?? [],
    (e) => (e.type === 'task.changed' && e.from == null) || e.type === 'resync',
    [],
  );
  const titles = new Map((tasks.data ?? []).map((t) => [t.id, t.title]));
  const list = [...(items.data ?? [])].sort((a, b) => b.created_at - a.created_at);
  return (
    <section>
      <div className="page-head">
        <h1>Needs you</h1>
      </div>
      {items.error && (
        <p className="error" role="alert">
          {items.error}
        </p>
      )}
      {items.data && list.length === 0 && <p className="empty">Nothing waits for you. Agents are on their own.</p>}
      {!items.data && <p className="empty">Loading…</p>}
      <div className="grid-cards">
        {list.map((it) => (
          <AttentionCard key={it.id} item={it} taskTitle={titles.get(it.task)} onAnswered={items.reload} />
        ))}
      </div>
    </section>
  );
}
