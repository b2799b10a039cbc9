import { useId, useState, type FormEvent } from 'react';
import { createSandbox } from '../api/actions';

const NAME = /^[a-z][a-z0-9-]{0,62}$/;

/**
 * Creates a sandbox from a workspace's prebuild (its image and shape; the manager
 * builds the prebuild first when there is none) or from an image with a shape.
 */
export function NewSandbox({
  workspaces,
  images,
  onCreated,
}: {
  workspaces: string[];
  images: string[];
  onCreated: (id: string) => void;
}) {
  const id = useId();
  const [name, setName] = useState('');
  const [from, setFrom] = useState(workspaces.length ? `ws:${workspaces[0]}` : images.length ? `img:${images[0]}` : '');
  const [vcpus, setVcpus] = useState('2');
  const [memory, setMemory] = useState('1024');
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<string | null>(null);
  const fromImage = from.startsWith('img:');

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (!NAME.test(name)) {
      setErr('name: lowercase letters, digits and -, starting with a letter');
      return;
    }
    if (!from) {
      setErr('nothing to start from: apply a workspace or build an image first');
      return;
    }
    setBusy(true);
    setErr(null);
    try {
      const body = fromImage
        ? { name, workspace: null, image: from.slice(4), vcpus: Number(vcpus), memory_mib: Number(memory) }
        : { name, workspace: from.slice(3) };
      const sb = await createSandbox(body);
      onCreated(sb.id);
    } catch (ex) {
      setErr(ex instanceof Error ? ex.message : String(ex));
    } finally {
      setBusy(false);
    }
  };

  return (
    <form className="card new-task" onSubmit={(e) => void submit(e)} aria-label="New sandbox" noValidate>
      <div className="row wrap">
        <div className="field">
          <label htmlFor={`${id}-name`}>Name</label>
          <input id={`${id}-name`} value={name} onChange={(e) => setName(e.target.value)} placeholder="demo" autoComplete="off" required />
        </div>
        <div className="field">
          <label htmlFor={`${id}-from`}>From</label>
          <select id={`${id}-from`} value={from} onChange={(e) => setFrom(e.target.value)}>
            {workspaces.map((w) => (
              <option key={`ws:${w}`} value={`ws:${w}`}>
                workspace {w}
              </option>
            ))}
            {images.map((i) => (
              <option key={`img:${i}`} value={`img:${i}`}>
                image {i}
              </option>
            ))}
          </select>
        </div>
        {fromImage && (
          <>
            <div className="field">
              <label htmlFor={`${id}-cpu`}>vCPUs</label>
              <input id={`${id}-cpu`} type="number" min={1} max={64} value={vcpus} onChange={(e) => setVcpus(e.target.value)} />
            </div>
            <div className="field">
              <label htmlFor={`${id}-mem`}>Memory (MiB)</label>
              <input id={`${id}-mem`} type="number" min={128} step={128} value={memory} onChange={(e) => setMemory(e.target.value)} />
            </div>
          </>
        )}
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
      <button type="submit" disabled={busy}>
        {busy ? 'Creating… (waits for the sandbox’s agent)' : 'Create sandbox'}
      </button>
    </form>
  );
}

/** Starts a dev command in a running sandbox. */
export function NewDev({ onStart }: { onStart: (body: { name: string; command: string; port: number | null }) => Promise<void> }) {
  const id = useId();
  const [name, setName] = useState('');
  const [command, setCommand] = useState('');
  const [port, setPort] = useState('');
  const [busy, setBusy] = useState(false);
  const [err, setErr] = useState<string | null>(null);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (!NAME.test(name) || name.length > 30) {
      setErr('name: 1-30 lowercase letters, digits and -, starting with a letter');
      return;
    }
    if (!command.trim()) {
      setErr('command: what to run, e.g. npm run dev');
      return;
    }
    const p = port.trim() ? Number(port) : null;
    if (p !== null && !(Number.isInteger(p) && p >= 1 && p <= 65535)) {
      setErr('port: 1-65535, or empty for a command without a URL');
      return;
    }
    setBusy(true);
    setErr(null);
    try {
      await onStart({ name, command, port: p });
      setName('');
      setCommand('');
      setPort('');
    } catch (ex) {
      setErr(ex instanceof Error ? ex.message : String(ex));
    } finally {
      setBusy(false);
    }
  };
  return (
    <form className="row wrap dev-new" onSubmit={(e) => void submit(e)} aria-label="Start a dev command" noValidate>
      <div className="field">
        <label htmlFor={`${id}-name`}>Name</label>
        <input id={`${id}-name`} value={name} onChange={(e) => setName(e.target.value)} placeholder="web" autoComplete="off" />
      </div>
      <div className="field">
        <label htmlFor={`${id}-cmd`}>Command</label>
        <input id={`${id}-cmd`} value={command} onChange={(e) => setCommand(e.target.value)} placeholder="npm run dev" autoComplete="off" />
      </div>
      <div className="field">
        <label htmlFor={`${id}-port`}>Port (optional)</label>
        <input id={`${id}-port`} type="number" min={1} max={65535} value={port} onChange={(e) => setPort(e.target.value)} placeholder="3000" />
      </div>
      {err && (
        <p className="error" role="alert">
          {err}
        </p>
      )}
      <button type="submit" className="small" disabled={busy}>
        {busy ? 'Starting…' : 'Start'}
      </button>
    </form>
  );
}
