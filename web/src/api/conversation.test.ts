import { describe, expect, it, vi } from 'vitest';
import { loadConversation, parseConversation } from './conversation';

const BODY = {
  task: 'tk-1',
  session: 'ses_1',
  live: true,
  truncated: false,
  messages: [
    { id: 'msg_1', role: 'user', text: 'Add feature.txt', tools: [] },
    {
      id: 'msg_2',
      role: 'assistant',
      text: 'Done.',
      tools: [{ call_id: 'c1', tool: 'bash', status: 'completed', input: 'cat feature.txt', title: 'Show it', output: 'made by the agent', output_truncated: false }],
      tokens_in: 100,
      tokens_out: 20,
      cost: 0.01,
      model: 'local/scripted',
    },
  ],
};

describe('the conversation adapter', () => {
  it('reads messages with their tool calls', () => {
    const c = parseConversation(BODY)!;
    expect(c.live).toBe(true);
    expect(c.messages).toHaveLength(2);
    expect(c.messages[1]!.tools[0]).toMatchObject({ tool: 'bash', input: 'cat feature.txt', output: 'made by the agent' });
    expect(c.messages[1]!.tokens_in).toBe(100);
  });
  it('refuses what is not a conversation', () => {
    expect(parseConversation(null)).toBeNull();
    expect(parseConversation({ messages: 'no' })).toBeNull();
  });
  it('answers null on a manager without the route', async () => {
    const f = vi.fn(async () => new Response('{"code":"not_found"}', { status: 404 })) as unknown as typeof fetch;
    expect(await loadConversation('tk-1', f)).toBeNull();
  });
});
