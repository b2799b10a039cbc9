import { describe, expect, it } from 'vitest';
import { parseDiff, sideBySide } from './diff';

const DIFF = `diff --git a/feature.txt b/feature.txt
new file mode 100644
index 0000000..3b18e51
--- /dev/null
+++ b/feature.txt
@@ -0,0 +1,2 @@
+made by the agent
+second line
diff --git a/src/app.rs b/src/app.rs
index 1111111..2222222 100644
--- a/src/app.rs
+++ b/src/app.rs
@@ -10,4 +10,5 @@ fn main() {
 let a = 1;
-let b = 2;
-let c = 3;
+let b = 20;
+let c = 30;
+let d = 40;
 done();
\\ No newline at end of file
diff --git a/old.txt b/old.txt
deleted file mode 100644
--- a/old.txt
+++ /dev/null
@@ -1 +0,0 @@
-bye
diff --git a/a.txt b/b.txt
similarity index 100%
rename from a.txt
rename to b.txt
diff --git a/logo.png b/logo.png
Binary files a/logo.png and b/logo.png differ
`;

describe('parseDiff', () => {
  const files = parseDiff(DIFF);
  it('finds every file with its status', () => {
    expect(files.map((f) => [f.path, f.status])).toEqual([
      ['feature.txt', 'added'],
      ['src/app.rs', 'modified'],
      ['old.txt', 'deleted'],
      ['b.txt', 'renamed'],
      ['logo.png', 'modified'],
    ]);
    expect(files[4]!.binary).toBe(true);
    expect(files[3]!.oldPath).toBe('a.txt');
  });
  it('numbers lines on both sides and counts changes', () => {
    const app = files[1]!;
    expect(app.additions).toBe(3);
    expect(app.deletions).toBe(2);
    const lines = app.hunks[0]!.lines;
    expect(lines[0]).toEqual({ kind: 'ctx', text: 'let a = 1;', old: 10, new: 10 });
    expect(lines[1]).toEqual({ kind: 'del', text: 'let b = 2;', old: 11, new: null });
    expect(lines[3]).toEqual({ kind: 'add', text: 'let b = 20;', old: null, new: 11 });
    expect(lines[6]).toEqual({ kind: 'ctx', text: 'done();', old: 13, new: 14 });
    expect(lines).toHaveLength(7);
  });
  it('reads an empty diff as no files', () => {
    expect(parseDiff('')).toEqual([]);
  });
});

describe('sideBySide', () => {
  it('pairs deletions with the additions after them', () => {
    const rows = sideBySide(parseDiff(DIFF)[1]!.hunks[0]!);
    expect(rows.map((r) => [r.left?.text ?? null, r.right?.text ?? null])).toEqual([
      ['let a = 1;', 'let a = 1;'],
      ['let b = 2;', 'let b = 20;'],
      ['let c = 3;', 'let c = 30;'],
      [null, 'let d = 40;'],
      ['done();', 'done();'],
    ]);
  });
});
