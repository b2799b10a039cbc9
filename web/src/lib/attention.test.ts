import { describe, expect, it } from 'vitest';
import { oneTap, permissionDetail, questions, replyAnswers } from './attention';

describe('attention details', () => {
  it('reads a permission with its command and diff', () => {
    const d = permissionDetail({
      permission: 'bash',
      patterns: ['cat feature.txt'],
      always: ['cat *'],
      metadata: { command: 'cat feature.txt', description: 'Show it', diff: '--- a\n+++ b', empty: '' },
    });
    expect(d.permission).toBe('bash');
    expect(d.patterns).toEqual(['cat feature.txt']);
    expect(d.always).toEqual(['cat *']);
    expect(d.metadata).toEqual([
      ['command', 'cat feature.txt'],
      ['description', 'Show it'],
    ]);
    expect(d.diff).toBe('--- a\n+++ b');
  });
  it('tolerates a detail without fields', () => {
    expect(permissionDetail(null)).toEqual({ permission: '', patterns: [], always: [], metadata: [], diff: null });
    expect(questions({})).toEqual([]);
  });
  it('reads questions and answers one-choice ones in one tap', () => {
    const qs = questions({
      questions: [{ question: 'Which database?', header: 'DB', options: [{ label: 'postgres', description: 'SQL' }, { label: 'mongodb' }], multiple: null, custom: null }],
    });
    expect(qs[0]).toEqual({
      question: 'Which database?',
      header: 'DB',
      options: [
        { label: 'postgres', description: 'SQL' },
        { label: 'mongodb', description: '' },
      ],
      multiple: false,
      custom: true,
    });
    expect(oneTap(qs)).toBe(true);
    expect(oneTap([...qs, ...qs])).toBe(false);
  });
  it('prefers typed text over picked options, per question', () => {
    const qs = questions({ questions: [{ question: 'a', options: [{ label: 'x' }] }, { question: 'b', options: [{ label: 'y' }], multiple: true }] });
    expect(replyAnswers(qs, [['x'], ['y']], ['', ''])).toEqual([['x'], ['y']]);
    expect(replyAnswers(qs, [['x'], []], ['', ' typed '])).toEqual([['x'], ['typed']]);
  });
});
