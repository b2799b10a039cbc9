// The conversation adapter: `GET /api/v1/tasks/{id}/messages` is being added on the
// server and is not in docs/openapi.json yet. Until it is, this reads it untyped
// and tolerates its absence (404: the task page shows the summary instead). When
// the endpoint lands: regenerate the schema, replace `Message` with the generated
// type and the fetch with `api.GET('/api/v1/tasks/{id}/messages', ...)`.

export interface MessagePart {
  type: string;
  text?: string;
  tool?: string;
  /** Anything else the server sends for a part (tool input, output…). */
  [k: string]: unknown;
}

export interface Message {
  id: string;
  role: string;
  parts: MessagePart[];
  created_at?: number;
}

/** The task's messages, or null when the manager has no such endpoint yet. */
export async function loadConversation(task: string, f: typeof fetch = fetch): Promise<Message[] | null> {
  const r = await f(`/api/v1/tasks/${encodeURIComponent(task)}/messages`, { credentials: 'same-origin' });
  if (r.status === 404 || r.status === 405) {
    // Either no endpoint (an HTML or plain answer) or no task: both show the summary.
    return null;
  }
  if (!r.ok) throw new Error(`messages: ${r.status}`);
  const body: unknown = await r.json();
  const list = Array.isArray(body) ? body : body && typeof body === 'object' && 'messages' in body ? (body as { messages: unknown }).messages : null;
  if (!Array.isArray(list)) return null;
  return list.map((m: Record<string, unknown>, i) => ({
    id: typeof m.id === 'string' ? m.id : String(i),
    role: typeof m.role === 'string' ? m.role : 'assistant',
    parts: Array.isArray(m.parts) ? (m.parts as MessagePart[]) : typeof m.text === 'string' ? [{ type: 'text', text: m.text }] : [],
    created_at: typeof m.created_at === 'number' ? m.created_at : undefined,
  }));
}
