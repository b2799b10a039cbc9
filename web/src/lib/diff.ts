// Parses a unified git diff into files, hunks and lines, and pairs lines for the
// side-by-side view.

export type LineKind = 'ctx' | 'add' | 'del';

export interface DiffLine {
  kind: LineKind;
  text: string;
  /** Line number on the old side (none for additions). */
  old: number | null;
  /** Line number on the new side (none for deletions). */
  new: number | null;
}

export interface Hunk {
  header: string;
  lines: DiffLine[];
}

export interface DiffFile {
  /** The path shown: the new path, or the old one for a deletion. */
  path: string;
  oldPath: string | null;
  newPath: string | null;
  status: 'added' | 'deleted' | 'modified' | 'renamed';
  binary: boolean;
  hunks: Hunk[];
  additions: number;
  deletions: number;
}

function stripPrefix(p: string): string | null {
  const t = p.trim().replace(/^"(.*)"$/, '$1');
  if (t === '/dev/null') return null;
  return t.replace(/^[ab]\//, '');
}

const HUNK = /^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@/;

/** Parses `git diff` output (several files). Unknown lines are ignored. */
export function parseDiff(text: string): DiffFile[] {
  const files: DiffFile[] = [];
  let file: DiffFile | null = null;
  let hunk: Hunk | null = null;
  let oldNo = 0;
  let newNo = 0;
  const lines = text.split('\n');
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  for (const line of lines) {
    if (line.startsWith('diff --git ')) {
      const m = /^diff --git a\/(.*) b\/(.*)$/.exec(line);
      file = {
        path: m?.[2] ?? line.slice(11),
        oldPath: m?.[1] ?? null,
        newPath: m?.[2] ?? null,
        status: 'modified',
        binary: false,
        hunks: [],
        additions: 0,
        deletions: 0,
      };
      files.push(file);
      hunk = null;
      continue;
    }
    if (!file) continue;
    if (!hunk) {
      if (line.startsWith('new file mode')) file.status = 'added';
      else if (line.startsWith('deleted file mode')) file.status = 'deleted';
      else if (line.startsWith('rename from ')) {
        file.status = 'renamed';
        file.oldPath = line.slice(12);
      } else if (line.startsWith('rename to ')) file.newPath = line.slice(10);
      else if (line.startsWith('Binary files ')) file.binary = true;
      else if (line.startsWith('--- ')) file.oldPath = stripPrefix(line.slice(4));
      else if (line.startsWith('+++ ')) file.newPath = stripPrefix(line.slice(4));
      if (file.status === 'added') file.oldPath = null;
      if (file.status === 'deleted') file.newPath = null;
      file.path = file.newPath ?? file.oldPath ?? file.path;
    }
    const h = HUNK.exec(line);
    if (h) {
      hunk = { header: line, lines: [] };
      file.hunks.push(hunk);
      oldNo = Number(h[1]);
      newNo = Number(h[2]);
      continue;
    }
    if (!hunk) continue;
    const c = line[0];
    const body = line.slice(1);
    if (c === '+') {
      hunk.lines.push({ kind: 'add', text: body, old: null, new: newNo++ });
      file.additions++;
    } else if (c === '-') {
      hunk.lines.push({ kind: 'del', text: body, old: oldNo++, new: null });
      file.deletions++;
    } else if (c === ' ' || line === '') {
      hunk.lines.push({ kind: 'ctx', text: body, old: oldNo++, new: newNo++ });
    }
    // "\ No newline at end of file" and the like are skipped.
  }
  return files;
}

export interface SideRow {
  left: DiffLine | null;
  right: DiffLine | null;
}

/** Pairs a hunk's lines for side by side: runs of deletions face the additions after them. */
export function sideBySide(h: Hunk): SideRow[] {
  const rows: SideRow[] = [];
  let i = 0;
  const ls = h.lines;
  while (i < ls.length) {
    const l = ls[i]!;
    if (l.kind === 'ctx') {
      rows.push({ left: l, right: l });
      i++;
      continue;
    }
    const dels: DiffLine[] = [];
    const adds: DiffLine[] = [];
    while (i < ls.length && ls[i]!.kind === 'del') dels.push(ls[i++]!);
    while (i < ls.length && ls[i]!.kind === 'add') adds.push(ls[i++]!);
    const n = Math.max(dels.length, adds.length);
    for (let k = 0; k < n; k++) rows.push({ left: dels[k] ?? null, right: adds[k] ?? null });
  }
  return rows;
}
