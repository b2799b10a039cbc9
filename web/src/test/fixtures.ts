import type { TaskView } from '../api/types';

export function task(over: Partial<TaskView> = {}): TaskView {
  return {
    id: 'tk-0000000001',
    workspace: 'shop',
    template: 'implementation',
    effort: 'medium',
    title: 'Add feature.txt',
    description: 'Add feature.txt',
    state: 'working',
    column: 'in-progress',
    branch: 'atelier/tk-0000000001-add-feature-txt',
    base_branch: 'main',
    parked: false,
    workspace_budget_waived: false,
    todos_done: 0,
    todos_total: 0,
    percent: 0,
    todos: [],
    files: [],
    messages: 0,
    tokens_in: 0,
    tokens_out: 0,
    cost: 0,
    pending: 0,
    queued_messages: 0,
    commits: [],
    created_at: 1000,
    updated_at: 1000,
    ...over,
  };
}
