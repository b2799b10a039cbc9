// Edits a workspace definition in fields; a validation error from the manager is
// shown at the field it names (ApiErrorBody.field), or above the form.
import { useId, useState, type FormEvent, type ReactNode } from 'react';
import { FieldError, formField, fromForm, toForm, type RepoRow, type WorkspaceForm, type WorkspaceSpec } from '../lib/workspaceForm';

/** What saving can fail with: the server's message and, for invalid input, its field. */
export interface SaveError {
  message: string;
  field?: string | null;
}

interface Props {
  spec: WorkspaceSpec;
  save: (spec: WorkspaceSpec) => Promise<SaveError | null>;
  onSaved?: () => void;
  onCancel?: () => void;
}

const EMPTY_REPO: RepoRow = { url: '', branch: '', path: '', push_url: '', credentials: '' };

export function WorkspaceEditor({ spec, save, onSaved, onCancel }: Props) {
  const id = useId();
  const [f, setF] = useState<WorkspaceForm>(() => toForm(spec));
  const [err, setErr] = useState<{ at: string | null; message: string } | null>(null);
  const [busy, setBusy] = useState(false);
  const set = <K extends keyof WorkspaceForm>(k: K, v: WorkspaceForm[K]) => setF((x) => ({ ...x, [k]: v }));
  const setRepo = (i: number, k: keyof RepoRow, v: string) => setF((x) => ({ ...x, repos: x.repos.map((r, j) => (j === i ? { ...r, [k]: v } : r)) }));

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setErr(null);
    let body: WorkspaceSpec;
    try {
      body = fromForm(f);
    } catch (ex) {
      if (ex instanceof FieldError) setErr({ at: formField(ex.field) ?? ex.field, message: ex.message });
      else setErr({ at: null, message: String(ex) });
      return;
    }
    setBusy(true);
    try {
      const r = await save(body);
      if (r) setErr({ at: formField(r.field), message: r.message });
      else onSaved?.();
    } finally {
      setBusy(false);
    }
  };

  return (
    <form className="card ws-editor" onSubmit={(e) => void submit(e)} aria-label="Edit workspace" noValidate>
      {err && (err.at === null || err.at === 'name') && (
        <p className="error" role="alert">
          {err.message}
        </p>
      )}
      <Field base={id} err={err} name="image" label="Image" hint="empty: dev-base">
        {(p) => <input {...p} value={f.image} onChange={(e) => set('image', e.target.value)} />}
      </Field>
      <div className="row wrap">
        <Field base={id} err={err} name="resources.vcpus" label="vCPUs (1–8)">
          {(p) => <input {...p} inputMode="numeric" value={f.vcpus} onChange={(e) => set('vcpus', e.target.value)} />}
        </Field>
        <Field base={id} err={err} name="resources.memory_mib" label="Memory MiB (512–16384)">
          {(p) => <input {...p} inputMode="numeric" value={f.memory_mib} onChange={(e) => set('memory_mib', e.target.value)} />}
        </Field>
        <Field base={id} err={err} name="resources.disk_gib" label="Disk GiB (1–512)">
          {(p) => <input {...p} inputMode="numeric" value={f.disk_gib} onChange={(e) => set('disk_gib', e.target.value)} />}
        </Field>
      </div>
      <fieldset className="repos">
        <legend>Repositories</legend>
        {err?.at === 'repos' && (
          <p className="error" role="alert">
            {err.message}
          </p>
        )}
        {f.repos.map((r, i) => (
          <div key={i} className="repo">
            <div className="row wrap">
              <Field base={id} err={err} name={`repos[${i}].url`} label="URL">
                {(p) => <input {...p} value={r.url} onChange={(e) => setRepo(i, 'url', e.target.value)} />}
              </Field>
              <Field base={id} err={err} name={`repos[${i}].branch`} label="Branch">
                {(p) => <input {...p} value={r.branch} placeholder="main" onChange={(e) => setRepo(i, 'branch', e.target.value)} />}
              </Field>
            </div>
            <div className="row wrap">
              <Field base={id} err={err} name={`repos[${i}].path`} label="Guest path">
                {(p) => <input {...p} value={r.path} placeholder="/workspace/app" onChange={(e) => setRepo(i, 'path', e.target.value)} />}
              </Field>
              <Field base={id} err={err} name={`repos[${i}].push_url`} label="Push URL (optional)">
                {(p) => <input {...p} value={r.push_url} onChange={(e) => setRepo(i, 'push_url', e.target.value)} />}
              </Field>
              <Field base={id} err={err} name={`repos[${i}].credentials`} label="Credentials secret (optional)">
                {(p) => <input {...p} value={r.credentials} onChange={(e) => setRepo(i, 'credentials', e.target.value)} />}
              </Field>
            </div>
            <button type="button" className="small ghost" onClick={() => setF((x) => ({ ...x, repos: x.repos.filter((_, j) => j !== i) }))}>
              Remove repository
            </button>
          </div>
        ))}
        <button type="button" className="small ghost" onClick={() => setF((x) => ({ ...x, repos: [...x.repos, { ...EMPTY_REPO }] }))}>
          Add repository
        </button>
      </fieldset>
      <Field base={id} err={err} name="init" label="Init commands (one a line, run once after cloning)">
        {(p) => <textarea {...p} rows={3} className="mono" value={f.init} onChange={(e) => set('init', e.target.value)} />}
      </Field>
      <div className="row wrap">
        <Field base={id} err={err} name="egress" label="Egress">
          {(p) => (
            <select {...p} value={f.egress} onChange={(e) => set('egress', e.target.value as WorkspaceForm['egress'])}>
              <option value="allow-all">allow all</option>
              <option value="deny-all">deny all</option>
              <option value="allow">only these domains</option>
            </select>
          )}
        </Field>
        {f.egress === 'allow' && (
          <div className="field">
            <label htmlFor={`${id}-allow`}>Domains (comma-separated, *.example.com)</label>
            <input id={`${id}-allow`} value={f.allow} onChange={(e) => set('allow', e.target.value)} />
          </div>
        )}
      </div>
      <Field base={id} err={err} name="other" label="Other settings (JSON: dev, secrets, opencode, opencode_keys)">
        {(p) => <textarea {...p} rows={8} className="mono" value={f.other} onChange={(e) => set('other', e.target.value)} spellCheck={false} />}
      </Field>
      <div className="actions">
        <button type="submit" disabled={busy}>
          {busy ? 'Saving…' : 'Save'}
        </button>
        {onCancel && (
          <button type="button" className="ghost" onClick={onCancel}>
            Cancel
          </button>
        )}
      </div>
    </form>
  );
}

interface FieldProps {
  id: string;
  'aria-invalid': true | undefined;
  'aria-describedby': string | undefined;
}

interface FieldArgs {
  name: string;
  label: string;
  hint?: string;
  base: string;
  err: { at: string | null; message: string } | null;
  children: (p: FieldProps) => ReactNode;
}

/** A labelled field with its error (if the error is about it). */
function Field({ name, label, hint, base, err, children }: FieldArgs) {
  const here = err?.at === name;
  const fid = `${base}-${name.replace(/[^a-z0-9]/gi, '-')}`;
  return (
    <div className={here ? 'field invalid' : 'field'}>
      <label htmlFor={fid}>{label}</label>
      {children({ id: fid, 'aria-invalid': here || undefined, 'aria-describedby': here ? `${fid}-err` : undefined })}
      {hint && !here && <span className="small-text">{hint}</span>}
      {here && (
        <span id={`${fid}-err`} className="error field-error" role="alert">
          {err.message}
        </span>
      )}
    </div>
  );
}
