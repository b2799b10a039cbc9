import { describe, expect, it } from 'vitest';
import { columnOf, defaultLane, groupTasks, laneOf, percent, reduceTasks, touches } from './live';
import { task } from '../test/fixtures';
import type { StreamEvent } from '../api/events';

describe('percent', () => {
  it('is 0 with no todos and floors like the server', () => {
    expect(percent(0, 0)).toBe(0);
    expect(percent(1, 3)).toBe(33);
    expect(percent(2, 3)).toBe(66);
    expect(percent(3, 3)).toBe(100);
  });
  it('never leaves 0..100', () => {
    expect(percent(5, 3)).toBe(100);
    expect(percent(-1, 3)).toBe(0);
  });
});

describe('board grouping', () => {
  it('puts every state in its lane', () => {
    expect(laneOf('backlog')).toBe('backlog');
    for (const s of ['queued', 'starting', 'working', 'finishing'] as const) expect(laneOf(s)).toBe('progress');
    expect(laneOf('waiting')).toBe('needs');
    expect(laneOf('review')).toBe('review');
    expect(laneOf('done')).toBe('done');
    expect(laneOf('failed')).toBe('failed');
    expect(laneOf('cancelled')).toBe('cancelled');
  });
  it('agrees with the server column names', () => {
    expect(columnOf('waiting')).toBe('needs-you');
    expect(columnOf('review')).toBe('needs-you');
    expect(columnOf('starting')).toBe('in-progress');
  });
  it('orders running work first, then the queue by position, the rest newest first', () => {
    const g = groupTasks([
      task({ id: 'q2', state: 'queued', queue_position: 2, updated_at: 9 }),
      task({ id: 'q1', state: 'queued', queue_position: 1, updated_at: 1 }),
      task({ id: 'w-old', state: 'working', updated_at: 1 }),
      task({ id: 'w-new', state: 'working', updated_at: 5 }),
      task({ id: 'd', state: 'done' }),
    ]);
    expect(g.progress.map((t) => t.id)).toEqual(['w-new', 'w-old', 'q1', 'q2']);
    expect(g.done.map((t) => t.id)).toEqual(['d']);
    expect(g.backlog).toEqual([]);
  });
});

describe('the SSE reducer', () => {
  const ev = (over: Partial<Extract<StreamEvent, { type: 'task.changed' }>> = {}): StreamEvent => ({
    type: 'task.changed',
    id: 1,
    at_ms: 1,
    task: 'tk-0000000001',
    workspace: 'shop',
    title: 'Add feature.txt',
    state: 'waiting',
    todos_done: 1,
    todos_total: 2,
    parked: false,
    ...over,
  });

  it('moves a known task at once and asks for a re-read of the rest', () => {
    const s = reduceTasks({ tasks: [task()], stale: false }, ev());
    expect(s.tasks[0]!.state).toBe('waiting');
    expect(s.tasks[0]!.column).toBe('needs-you');
    expect(s.tasks[0]!.percent).toBe(50);
    expect(s.stale).toBe(true);
  });
  it('marks the list stale for an unknown task without inventing one', () => {
    const s = reduceTasks({ tasks: [task()], stale: false }, ev({ task: 'tk-other' }));
    expect(s.tasks).toHaveLength(1);
    expect(s.stale).toBe(true);
  });
  it('re-reads on resync and attention changes, ignores sandbox events', () => {
    const base = { tasks: [task()], stale: false };
    expect(reduceTasks(base, { type: 'resync' }).stale).toBe(true);
    expect(
      reduceTasks(base, { type: 'attention.changed', id: 2, at_ms: 2, item: 'at-1', task: 'tk-0000000001', kind: 'permission', status: 'pending', title: 'bash' }).stale,
    ).toBe(true);
    expect(reduceTasks(base, { type: 'sandbox.deleted', id: 3, at_ms: 3, sandbox: 'sb-1', name: 'x' })).toBe(base);
  });
  it('clears the queue position once a task leaves the queue', () => {
    const s = reduceTasks({ tasks: [task({ state: 'queued', queue_position: 1 })], stale: false }, ev({ state: 'starting' }));
    expect(s.tasks[0]!.queue_position).toBeNull();
  });
  it('says which lists an event touches', () => {
    expect([...touches({ type: 'resync' })].sort()).toEqual(['attention', 'prebuilds', 'sandboxes', 'tasks', 'workspaces']);
    expect([...touches(ev())]).toEqual(['tasks']);
  });
});

describe('the lane a phone shows first', () => {
  it('is the first with cards: needs you, in progress, review, backlog, done', () => {
    expect(defaultLane(groupTasks([]))).toBe('progress');
    expect(defaultLane(groupTasks([task({ state: 'done' }), task({ state: 'review' })]))).toBe('review');
    expect(defaultLane(groupTasks([task({ state: 'working' }), task({ state: 'waiting' })]))).toBe('needs');
  });
});
