// Reads an attention item's `detail` (what OpenCode sent, as the server stores it)
// into typed shapes, tolerating missing fields.

export interface PermissionDetail {
  permission: string;
  patterns: string[];
  always: string[];
  /** Displayable metadata: the command, the path, the diff… */
  metadata: [string, string][];
  diff: string | null;
}

export interface QuestionOption {
  label: string;
  description: string;
}

export interface Question {
  question: string;
  header: string;
  options: QuestionOption[];
  multiple: boolean;
  /** Free text allowed (OpenCode's default). */
  custom: boolean;
}

function obj(v: unknown): Record<string, unknown> {
  return v && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : {};
}

function strs(v: unknown): string[] {
  return Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : [];
}

function str(v: unknown): string {
  return typeof v === 'string' ? v : '';
}

export function permissionDetail(detail: unknown): PermissionDetail {
  const d = obj(detail);
  const md = obj(d.metadata);
  let diff: string | null = null;
  const metadata: [string, string][] = [];
  for (const [k, v] of Object.entries(md)) {
    if (k === 'diff' && typeof v === 'string') {
      diff = v;
      continue;
    }
    if (v === null || v === undefined || v === '') continue;
    metadata.push([k, typeof v === 'string' ? v : JSON.stringify(v)]);
  }
  return { permission: str(d.permission), patterns: strs(d.patterns), always: strs(d.always), metadata, diff };
}

export function questions(detail: unknown): Question[] {
  const qs = obj(detail).questions;
  if (!Array.isArray(qs)) return [];
  return qs.map((q) => {
    const o = obj(q);
    return {
      question: str(o.question),
      header: str(o.header),
      options: (Array.isArray(o.options) ? o.options : []).map((x) => {
        const p = obj(x);
        return { label: str(p.label), description: str(p.description) };
      }),
      multiple: o.multiple === true,
      custom: o.custom !== false,
    };
  });
}

/** A question answers in one tap when it is a single one-choice question. */
export function oneTap(qs: Question[]): boolean {
  return qs.length === 1 && !qs[0]!.multiple && qs[0]!.options.length > 0;
}

/** The `answers` of a reply: per question, the chosen labels, or the typed text. */
export function replyAnswers(qs: Question[], picked: string[][], typed: string[]): string[][] {
  return qs.map((_, i) => {
    const t = (typed[i] ?? '').trim();
    if (t) return [t];
    return picked[i] ?? [];
  });
}
