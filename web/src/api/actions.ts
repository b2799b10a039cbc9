// Task and attention actions over the typed client; each throws with the server's
// message on failure so forms can show it.
import { api, errorText } from './client';
import type { Answer, Effort, TaskView } from './types';

function check<T>(r: { data?: T; error?: unknown; response: Response }): T {
  if (r.error !== undefined || !r.response.ok) throw new Error(errorText(r.error ?? r.response.statusText));
  return r.data as T;
}

export type TaskAction = 'start' | 'cancel' | 'retry' | 'done';

export async function taskAction(id: string, action: TaskAction): Promise<TaskView> {
  const params = { params: { path: { id } } };
  switch (action) {
    case 'start':
      return check(await api.POST('/api/v1/tasks/{id}/start', params));
    case 'cancel':
      return check(await api.POST('/api/v1/tasks/{id}/cancel', params));
    case 'retry':
      return check(await api.POST('/api/v1/tasks/{id}/retry', params));
    case 'done':
      return check(await api.POST('/api/v1/tasks/{id}/done', params));
  }
}

export async function createTask(body: {
  workspace: string;
  description: string;
  template: string | null;
  effort: Effort | null;
  start: boolean;
}): Promise<TaskView> {
  return check(await api.POST('/api/v1/tasks', { body }));
}

export async function say(id: string, text: string): Promise<void> {
  check(await api.POST('/api/v1/tasks/{id}/say', { params: { path: { id } }, body: { text } }));
}

export async function chain(
  id: string,
  body: { template: string | null; description: string | null; effort: Effort | null; start: boolean },
): Promise<TaskView> {
  return check(await api.POST('/api/v1/tasks/{id}/chain', { params: { path: { id } }, body }));
}

export async function answer(item: string, a: Answer): Promise<void> {
  check(await api.POST('/api/v1/attention/{id}/answer', { params: { path: { id: item } }, body: a }));
}

export { check };

export type NewSandbox = {
  name: string;
  /** From this workspace's prebuild (its image and shape), or else from `image`. */
  workspace: string | null;
  image?: string;
  vcpus?: number;
  memory_mib?: number;
};

/** Creates a sandbox; resolves once its agent answers (the API waits for it). */
export async function createSandbox(body: NewSandbox) {
  return check(await api.POST('/api/v1/sandboxes', { body }));
}

/** Starts a supervised dev command in a sandbox (with a port: it gets a URL). */
export async function startDev(sandbox: string, body: { name: string; command: string; port: number | null }) {
  return check(await api.POST('/api/v1/sandboxes/{id}/dev', { params: { path: { id: sandbox } }, body }));
}

/** Stops a dev command. */
export async function stopDev(sandbox: string, name: string): Promise<void> {
  check(await api.DELETE('/api/v1/sandboxes/{id}/dev/{name}', { params: { path: { id: sandbox, name } } }));
}
