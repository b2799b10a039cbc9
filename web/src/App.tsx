import { useEffect, useState } from 'react';
import { loadMe, logout, type Me } from './api/client';
import { stream, type Status } from './api/events';
import { Link, match, usePath } from './lib/router';
import { useLive } from './lib/hooks';
import { api } from './api/client';
import { Board } from './pages/Board';
import { NeedsYou } from './pages/NeedsYou';
import { TaskPage } from './pages/TaskPage';
import { Sandboxes, SandboxPage } from './pages/Sandboxes';
import { Workspaces, WorkspacePage } from './pages/Workspaces';
import { useNotifications } from './lib/notify';

function Page({ path }: { path: string }) {
  let m: Record<string, string> | null;
  if (path === '/' || path === '/tasks') return <Board />;
  if (path === '/needs') return <NeedsYou />;
  if ((m = match('/tasks/:id', path))) return <TaskPage id={m.id!} />;
  if (path === '/sandboxes') return <Sandboxes />;
  if ((m = match('/sandboxes/:id', path))) return <SandboxPage id={m.id!} />;
  if (path === '/workspaces') return <Workspaces />;
  if ((m = match('/workspaces/:name', path))) return <WorkspacePage name={m.name!} />;
  return (
    <section>
      <h1>Not found</h1>
      <p>
        Nothing at <code>{path}</code>. <Link href="/">Back to the tasks</Link>
      </p>
    </section>
  );
}

function NavLink({ href, path, children }: { href: string; path: string; children: React.ReactNode }) {
  const active = href === '/' ? path === '/' || path.startsWith('/tasks') : path.startsWith(href);
  return (
    <Link href={href} className={active ? 'nav-link active' : 'nav-link'} aria-current={active ? 'page' : undefined}>
      {children}
    </Link>
  );
}

export function App() {
  const path = usePath();
  const [me, setMe] = useState<Me | null | undefined>(undefined);
  const [status, setStatus] = useState<Status>('connecting');
  useEffect(() => {
    loadMe().then(setMe, () => setMe(null));
  }, []);
  useEffect(() => stream.onStatus(setStatus), []);
  const pending = useLive(
    async () => (await api.GET('/api/v1/attention')).data ?? [],
    (e) => e.type === 'attention.changed' || e.type === 'resync',
    [],
  );
  const count = pending.data?.length ?? 0;
  const notify = useNotifications();

  return (
    <div className="app">
      <header className="top">
        <Link href="/" className="brand">
          <img src="/icon.svg" alt="" width="24" height="24" />
          <span>Atelier</span>
        </Link>
        <nav aria-label="Main">
          <NavLink href="/" path={path}>
            Tasks
          </NavLink>
          <NavLink href="/needs" path={path}>
            Needs you{' '}
            {count > 0 && (
              <span className="badge" data-testid="needs-count">
                {count}
              </span>
            )}
          </NavLink>
          <NavLink href="/sandboxes" path={path}>
            Sandboxes
          </NavLink>
          <NavLink href="/workspaces" path={path}>
            Workspaces
          </NavLink>
        </nav>
        <div className="top-right">
          <span className={`live live-${status}`} title={`Live updates: ${status}`} role="status">
            <span className="dot" aria-hidden="true" />
            <span className="sr-only">Live updates {status}</span>
          </span>
          {notify.supported && notify.permission === 'default' && (
            <button type="button" className="ghost small" onClick={notify.ask}>
              Notify me
            </button>
          )}
          {me?.via === 'session' && (
            <button type="button" className="ghost small" onClick={() => void logout()}>
              Sign out
            </button>
          )}
        </div>
      </header>
      <main>
        <Page path={path} />
      </main>
    </div>
  );
}
