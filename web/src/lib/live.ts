// Pure state logic for live lists: apply a task event to the board's tasks at once,
// and decide which lists an event makes stale (they are re-read, never polled).
import type { StreamEvent } from '../api/events';
import type { TaskState, TaskView } from '../api/types';

/** The server's board column for a state (TaskView.column). */
export function columnOf(state: TaskState): string {
  switch (state) {
    case 'backlog':
      return 'backlog';
    case 'queued':
    case 'starting':
    case 'working':
    case 'finishing':
      return 'in-progress';
    case 'waiting':
    case 'review':
      return 'needs-you';
    default:
      return state;
  }
}

/** Percent of todos done, 0 with none, never above 100. */
export function percent(done: number, total: number): number {
  if (total <= 0) return 0;
  return Math.max(0, Math.min(100, Math.floor((done * 100) / total)));
}

export interface TasksState {
  tasks: TaskView[];
  /** A task was seen that the list does not hold: re-read it. */
  stale: boolean;
}

/** Applies an event to the task list (a pure reducer). */
export function reduceTasks(s: TasksState, e: StreamEvent): TasksState {
  if (e.type === 'resync') return { ...s, stale: true };
  if (e.type === 'attention.changed') {
    // The pending count moves: re-read for the exact number.
    return { ...s, stale: true };
  }
  if (e.type !== 'task.changed') return s;
  const i = s.tasks.findIndex((t) => t.id === e.task);
  if (i < 0) return { ...s, stale: true };
  const old = s.tasks[i]!;
  const next: TaskView = {
    ...old,
    state: e.state,
    column: columnOf(e.state),
    title: e.title,
    parked: e.parked,
    todos_done: e.todos_done,
    todos_total: e.todos_total,
    percent: percent(e.todos_done, e.todos_total),
    error: e.error ?? old.error ?? null,
    queue_position: e.state === 'queued' ? old.queue_position : null,
  };
  const tasks = s.tasks.slice();
  tasks[i] = next;
  // Usage, files and the like are not in the event: re-read soon.
  return { tasks, stale: true };
}

/** Which lists an event makes stale. */
export function touches(e: StreamEvent): Set<'tasks' | 'attention' | 'sandboxes' | 'prebuilds' | 'workspaces'> {
  const out = new Set<'tasks' | 'attention' | 'sandboxes' | 'prebuilds' | 'workspaces'>();
  switch (e.type) {
    case 'resync':
      out.add('tasks').add('attention').add('sandboxes').add('prebuilds').add('workspaces');
      break;
    case 'task.changed':
      out.add('tasks');
      break;
    case 'attention.changed':
      out.add('attention').add('tasks');
      break;
    case 'sandbox.created':
    case 'sandbox.state':
    case 'sandbox.deleted':
    case 'sandbox.agent':
    case 'dev.state':
      out.add('sandboxes');
      break;
    case 'prebuild.status':
      out.add('prebuilds');
      break;
    case 'workspace.changed':
      out.add('workspaces').add('prebuilds');
      break;
    default:
      break;
  }
  return out;
}

/** Board lanes, in order. */
export type Lane = 'backlog' | 'progress' | 'needs' | 'review' | 'done' | 'failed' | 'cancelled';

export const LANES: { id: Lane; title: string }[] = [
  { id: 'backlog', title: 'Backlog' },
  { id: 'progress', title: 'In progress' },
  { id: 'needs', title: 'Needs you' },
  { id: 'review', title: 'Review' },
  { id: 'done', title: 'Done' },
  { id: 'failed', title: 'Failed' },
  { id: 'cancelled', title: 'Cancelled' },
];

/** The board lane of a state. */
export function laneOf(state: TaskState): Lane {
  switch (state) {
    case 'backlog':
      return 'backlog';
    case 'queued':
    case 'starting':
    case 'working':
    case 'finishing':
      return 'progress';
    case 'waiting':
      return 'needs';
    case 'review':
      return 'review';
    case 'done':
      return 'done';
    case 'failed':
      return 'failed';
    case 'cancelled':
      return 'cancelled';
  }
}

/** Groups tasks into lanes; queued tasks by queue position, the rest newest first. */
export function groupTasks(tasks: TaskView[]): Record<Lane, TaskView[]> {
  const out: Record<Lane, TaskView[]> = {
    backlog: [],
    progress: [],
    needs: [],
    review: [],
    done: [],
    failed: [],
    cancelled: [],
  };
  for (const t of tasks) out[laneOf(t.state)].push(t);
  for (const lane of Object.values(out)) {
    lane.sort((a, b) => {
      const qa = a.state === 'queued' ? (a.queue_position ?? 1e9) : -1;
      const qb = b.state === 'queued' ? (b.queue_position ?? 1e9) : -1;
      if (qa !== qb) return qa - qb;
      return b.updated_at - a.updated_at;
    });
  }
  return out;
}

/** The lane a phone shows first: where attention is needed, then work, then the rest. */
export function defaultLane(lanes: Record<Lane, TaskView[]>): Lane {
  const order: Lane[] = ['needs', 'progress', 'review', 'backlog', 'done'];
  return order.find((l) => lanes[l].length > 0) ?? 'progress';
}
