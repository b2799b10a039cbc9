// The workspace editor's form model: what a person edits in fields (image,
// resources, repositories, init commands, egress), the rest of the definition kept
// as JSON, and where a server error naming a field (`repos[1].path`) is shown.
import type { components } from '../api/schema';

export type WorkspaceSpec = components['schemas']['WorkspaceSpec'];

export interface RepoRow {
  url: string;
  branch: string;
  path: string;
  push_url: string;
  credentials: string;
}

export interface WorkspaceForm {
  name: string;
  image: string;
  vcpus: string;
  memory_mib: string;
  disk_gib: string;
  repos: RepoRow[];
  /** One command a line. */
  init: string;
  egress: 'allow-all' | 'deny-all' | 'allow';
  /** Comma- or line-separated domain patterns when egress is `allow`. */
  allow: string;
  /** Everything else (dev, secrets, opencode, …) as JSON. */
  other: string;
}

const FORM_KEYS = new Set(['name', 'image', 'resources', 'repos', 'init', 'egress']);

export function toForm(spec: WorkspaceSpec): WorkspaceForm {
  const egress = spec.egress;
  const rest: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(spec)) if (!FORM_KEYS.has(k)) rest[k] = v;
  return {
    name: spec.name,
    image: spec.image ?? '',
    vcpus: String(spec.resources?.vcpus ?? ''),
    memory_mib: String(spec.resources?.memory_mib ?? ''),
    disk_gib: String(spec.resources?.disk_gib ?? ''),
    repos: (spec.repos ?? []).map((r) => ({
      url: r.url,
      branch: r.branch ?? '',
      path: r.path,
      push_url: r.push_url ?? '',
      credentials: r.credentials ?? '',
    })),
    init: (spec.init ?? []).join('\n'),
    egress: egress === 'allow-all' || egress === 'deny-all' ? egress : egress && typeof egress === 'object' ? 'allow' : 'allow-all',
    allow: egress && typeof egress === 'object' ? egress.allow.join(', ') : '',
    other: JSON.stringify(rest, null, 2),
  };
}

/** A number field: empty is "the default", anything else must be an integer. */
function int(v: string, field: string): number | undefined {
  const t = v.trim();
  if (t === '') return undefined;
  if (!/^-?\d+$/.test(t)) throw new FieldError(field, 'must be a whole number');
  return Number(t);
}

/** A client-side error at one field (the same shape the server's `field` uses). */
export class FieldError extends Error {
  constructor(
    public field: string,
    message: string,
  ) {
    super(message);
  }
}

/** Builds the definition to PUT; throws FieldError for what cannot be built. */
export function fromForm(f: WorkspaceForm): WorkspaceSpec {
  let other: Record<string, unknown> = {};
  if (f.other.trim()) {
    try {
      const v: unknown = JSON.parse(f.other);
      if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('not an object');
      other = v as Record<string, unknown>;
    } catch (e) {
      throw new FieldError('other', `not a JSON object: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  for (const k of Object.keys(other)) {
    if (FORM_KEYS.has(k)) throw new FieldError('other', `${k} is edited in its own field above`);
  }
  const resources: Record<string, number> = {};
  const vcpus = int(f.vcpus, 'resources.vcpus');
  const mem = int(f.memory_mib, 'resources.memory_mib');
  const disk = int(f.disk_gib, 'resources.disk_gib');
  if (vcpus !== undefined) resources.vcpus = vcpus;
  if (mem !== undefined) resources.memory_mib = mem;
  if (disk !== undefined) resources.disk_gib = disk;
  const spec: Record<string, unknown> = {
    ...other,
    name: f.name,
    resources,
    repos: f.repos.map((r) => {
      const o: Record<string, unknown> = { url: r.url.trim(), path: r.path.trim() };
      if (r.branch.trim()) o.branch = r.branch.trim();
      if (r.push_url.trim()) o.push_url = r.push_url.trim();
      if (r.credentials.trim()) o.credentials = r.credentials.trim();
      return o;
    }),
    init: f.init
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean),
    egress:
      f.egress === 'allow'
        ? {
            allow: f.allow
              .split(/[\s,]+/)
              .map((d) => d.trim())
              .filter(Boolean),
          }
        : f.egress,
  };
  if (f.image.trim()) spec.image = f.image.trim();
  return spec as WorkspaceSpec;
}

/**
 * The form field a server error's `field` belongs to: `repos[1].path` stays itself,
 * list items of init and egress go to their text box, the rest of the document to
 * the JSON box; null for none (shown above the form).
 */
export function formField(field: string | null | undefined): string | null {
  if (!field) return null;
  const f = field.trim();
  if (f === 'image' || f === 'name') return f;
  if (/^resources\.(vcpus|memory_mib|disk_gib)$/.test(f)) return f;
  if (f === 'resources') return 'resources.vcpus';
  const repo = /^repos\[(\d+)\](?:\.(url|branch|path|push_url|credentials))?/.exec(f);
  if (repo) return `repos[${repo[1]}].${repo[2] ?? 'url'}`;
  if (f === 'repos') return 'repos';
  if (f === 'init' || f.startsWith('init[')) return 'init';
  if (f === 'egress' || f.startsWith('egress')) return 'egress';
  return 'other';
}
