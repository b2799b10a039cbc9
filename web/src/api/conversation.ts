// The conversation adapter. `GET /api/v1/tasks/{id}/messages` (a `Conversation` of
// `MessageView`s) is being added on the server by another branch and is not in this
// branch's docs/openapi.json yet, so these types mirror that branch's schema by hand
// and the route is read untyped. A 404 from a manager without the route shows the
// summary instead. Once the route is in docs/openapi.json: `npm run gen`, replace
// these interfaces with `components['schemas']['Conversation' | 'MessageView' |
// 'ToolCallView']` and the fetch with `api.GET('/api/v1/tasks/{id}/messages', …)`.

/** One tool call of an assistant message (ToolCallView). */
export interface ToolCall {
  call_id: string;
  tool: string;
  status: string;
  input: string;
  title?: string | null;
  output?: string | null;
  output_truncated: boolean;
}

/** One message of the task's session (MessageView). */
export interface Message {
  id: string;
  role: string;
  text: string;
  tools: ToolCall[];
  created_at?: number | null;
  completed_at?: number | null;
  model?: string | null;
  tokens_in?: number | null;
  tokens_out?: number | null;
  cost?: number | null;
  error?: string | null;
}

/** A task's conversation (Conversation). */
export interface Conversation {
  task: string;
  session?: string | null;
  live: boolean;
  truncated: boolean;
  captured_at?: number | null;
  messages: Message[];
}

function str(v: unknown): string {
  return typeof v === 'string' ? v : '';
}

function num(v: unknown): number | null {
  return typeof v === 'number' ? v : null;
}

/** Reads a Conversation body defensively (it is not type-checked against a schema yet). */
export function parseConversation(body: unknown): Conversation | null {
  if (!body || typeof body !== 'object') return null;
  const b = body as Record<string, unknown>;
  if (!Array.isArray(b.messages)) return null;
  return {
    task: str(b.task),
    session: typeof b.session === 'string' ? b.session : null,
    live: b.live === true,
    truncated: b.truncated === true,
    captured_at: num(b.captured_at),
    messages: b.messages.map((raw: unknown, i) => {
      const m = (raw && typeof raw === 'object' ? raw : {}) as Record<string, unknown>;
      return {
        id: str(m.id) || String(i),
        role: str(m.role) || 'assistant',
        text: str(m.text),
        tools: (Array.isArray(m.tools) ? m.tools : []).map((t: unknown) => {
          const o = (t && typeof t === 'object' ? t : {}) as Record<string, unknown>;
          return {
            call_id: str(o.call_id),
            tool: str(o.tool),
            status: str(o.status),
            input: str(o.input),
            title: typeof o.title === 'string' ? o.title : null,
            output: typeof o.output === 'string' ? o.output : null,
            output_truncated: o.output_truncated === true,
          };
        }),
        created_at: num(m.created_at),
        completed_at: num(m.completed_at),
        model: typeof m.model === 'string' ? m.model : null,
        tokens_in: num(m.tokens_in),
        tokens_out: num(m.tokens_out),
        cost: num(m.cost),
        error: typeof m.error === 'string' ? m.error : null,
      };
    }),
  };
}

/** The task's conversation, or null when the manager has no such route yet. */
export async function loadConversation(task: string, f: typeof fetch = fetch): Promise<Conversation | null> {
  const r = await f(`/api/v1/tasks/${encodeURIComponent(task)}/messages`, { credentials: 'same-origin' });
  if (r.status === 404 || r.status === 405) return null;
  if (!r.ok) throw new Error(`messages: ${r.status}`);
  return parseConversation(await r.json());
}
