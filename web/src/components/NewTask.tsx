import { useId, useState, type FormEvent } from 'react';
import { api } from '../api/client';
import { createTask } from '../api/actions';
import type { Effort } from '../api/types';
import { useLive } from '../lib/hooks';

const EFFORTS: Effort[] = ['low', 'medium', 'high', 'max'];

export function NewTask({ onCreated }: { onCreated?: () => void }) {
  const id = useId();
  const workspaces = useLive(async () => (await api.GET('/api/v1/workspaces')).data ?? [], (e) => e.type === 'workspace.changed', []);
  const templates = useLive(async () => (await api.GET('/api/v1/templates')).data ?? [], () => false, []);
  const [workspace, setWorkspace] = useState('');
  const [template, setTemplate] = useState('');
  const [effort, setEffort] = useState<Effort | ''>('');
  const [prompt, setPrompt] = useState('');
  const [start, setStart] = useState(true);
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<string | null>(null);
  const ws = workspace || workspaces.data?.[0]?.name || '';

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (!ws) {
      setErr('no workspace: apply one first (atelier workspace apply -f)');
      return;
    }
    if (!prompt.trim()) {
      setErr('the prompt is empty: say what the agent should do');
      return;
    }
    setBusy(true);
    setErr(null);
    try {
      await createTask({ workspace: ws, description: prompt, template: template || null, effort: effort || null, start });
      setPrompt('');
      onCreated?.();
    } catch (ex) {
      setErr(ex instanceof Error ? ex.message : String(ex));
    } finally {
      setBusy(false);
    }
  };

  return (
    <form className="card new-task" onSubmit={(e) => void submit(e)} aria-label="New task">
      <div className="field">
        <label htmlFor={`${id}-prompt`}>Prompt</label>
        <textarea
          id={`${id}-prompt`}
          rows={3}
          value={prompt}
          onChange={(e) => setPrompt(e.target.value)}
          placeholder="What should the agent do? The first line is the title."
          required
        />
      </div>
      <div className="row wrap">
        <div className="field">
          <label htmlFor={`${id}-ws`}>Workspace</label>
          <select id={`${id}-ws`} value={ws} onChange={(e) => setWorkspace(e.target.value)}>
            {(workspaces.data ?? []).map((w) => (
              <option key={w.name} value={w.name}>
                {w.name}
              </option>
            ))}
          </select>
        </div>
        <div className="field">
          <label htmlFor={`${id}-tpl`}>Template</label>
          <select id={`${id}-tpl`} value={template} onChange={(e) => setTemplate(e.target.value)}>
            <option value="">implementation (default)</option>
            {(templates.data ?? [])
              .filter((t) => t.name !== 'implementation')
              .map((t) => (
                <option key={t.name} value={t.name}>
                  {t.name}
                </option>
              ))}
          </select>
        </div>
        <div className="field">
          <label htmlFor={`${id}-effort`}>Effort</label>
          <select id={`${id}-effort`} value={effort} onChange={(e) => setEffort(e.target.value as Effort | '')}>
            <option value="">template default</option>
            {EFFORTS.map((x) => (
              <option key={x} value={x}>
                {x}
              </option>
            ))}
          </select>
        </div>
        <label className="check">
          <input type="checkbox" checked={start} onChange={(e) => setStart(e.target.checked)} /> Start now
        </label>
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
      <button type="submit" disabled={busy}>
        {busy ? 'Creating…' : 'Create task'}
      </button>
    </form>
  );
}
