// A task's conversation with its agent: `GET /api/v1/tasks/{id}/messages` through
// the typed client (live from OpenCode while the sandbox runs, else the copy kept
// on the task).
import { api } from './client';
import { check } from './actions';
import type { Conversation } from './types';

export type { Conversation, MessageView as Message, ToolCallView as ToolCall } from './types';

/** The task's newest `limit` messages, oldest first. */
export async function loadConversation(task: string, limit = 200): Promise<Conversation> {
  return check(
    await api.GET('/api/v1/tasks/{id}/messages', { params: { path: { id: task }, query: { limit } } }),
  );
}
