import { useEffect, useState } from 'react';
import { parseDiff, sideBySide, type DiffFile, type DiffLine } from '../lib/diff';

function useWide(): boolean {
  const q = '(min-width: 1000px)';
  const [wide, setWide] = useState(() => typeof window.matchMedia === 'function' && window.matchMedia(q).matches);
  useEffect(() => {
    if (typeof window.matchMedia !== 'function') return;
    const m = window.matchMedia(q);
    const on = () => setWide(m.matches);
    m.addEventListener('change', on);
    return () => m.removeEventListener('change', on);
  }, []);
  return wide;
}

function Num({ n }: { n: number | null }) {
  return <td className="ln">{n ?? ''}</td>;
}

function Cell({ l }: { l: DiffLine | null }) {
  if (!l) return <td className="code-cell empty" />;
  return <td className={`code-cell ${l.kind}`}>{l.text}</td>;
}

function FileDiff({ f, split }: { f: DiffFile; split: boolean }) {
  const anchor = `diff-${f.path.replace(/[^a-zA-Z0-9]/g, '-')}`;
  return (
    <section className="diff-file" id={anchor} data-testid="diff-file" data-path={f.path}>
      <h3 className="mono">
        {f.path} <span className={`chip file-${f.status}`}>{f.status}</span>{' '}
        <span className="add-n">+{f.additions}</span> <span className="del-n">−{f.deletions}</span>
      </h3>
      {f.binary && <p className="small-text">Binary file</p>}
      <div className="diff-scroll">
        <table className={split ? 'diff split' : 'diff unified'}>
          <tbody>
            {f.hunks.map((h, hi) => [
              <tr key={`h${hi}`} className="hunk">
                <td colSpan={split ? 4 : 3}>{h.header}</td>
              </tr>,
              ...(split
                ? sideBySide(h).map((r, ri) => (
                    <tr key={`${hi}-${ri}`}>
                      <Num n={r.left?.old ?? null} />
                      <Cell l={r.left} />
                      <Num n={r.right?.new ?? null} />
                      <Cell l={r.right} />
                    </tr>
                  ))
                : h.lines.map((l, li) => (
                    <tr key={`${hi}-${li}`}>
                      <Num n={l.old} />
                      <Num n={l.new} />
                      <td className={`code-cell ${l.kind}`}>
                        <span className="sign" aria-hidden="true">
                          {l.kind === 'add' ? '+' : l.kind === 'del' ? '−' : ' '}
                        </span>
                        {l.text}
                      </td>
                    </tr>
                  ))),
            ])}
          </tbody>
        </table>
      </div>
    </section>
  );
}

export function DiffView({ text }: { text: string }) {
  const wide = useWide();
  const [mode, setMode] = useState<'auto' | 'unified' | 'split'>('auto');
  const files = parseDiff(text);
  const split = mode === 'split' || (mode === 'auto' && wide);
  if (files.length === 0) return <p className="empty">No changes yet.</p>;
  return (
    <div className="diff-view">
      <div className="row wrap between">
        <ul className="file-list" aria-label="Files changed">
          {files.map((f) => (
            <li key={f.path}>
              <a href={`#diff-${f.path.replace(/[^a-zA-Z0-9]/g, '-')}`} className="mono">
                {f.path}
              </a>{' '}
              <span className="add-n">+{f.additions}</span> <span className="del-n">−{f.deletions}</span>
            </li>
          ))}
        </ul>
        <div className="seg" role="group" aria-label="Diff layout">
          <button type="button" className={!split ? 'small on' : 'small'} aria-pressed={!split} onClick={() => setMode('unified')}>
            Unified
          </button>
          <button type="button" className={split ? 'small on' : 'small'} aria-pressed={split} onClick={() => setMode('split')}>
            Side by side
          </button>
        </div>
      </div>
      {files.map((f) => (
        <FileDiff key={f.path} f={f} split={split} />
      ))}
    </div>
  );
}
