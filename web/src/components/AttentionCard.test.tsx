import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { cleanup, fireEvent, render, screen, waitFor } from '@testing-library/react';
import type { AttentionView } from '../api/types';

const answer = vi.fn(async () => {});
vi.mock('../api/actions', () => ({ answer: (...a: unknown[]) => answer(...(a as [])) }));
const { AttentionCard } = await import('./AttentionCard');

afterEach(cleanup);
beforeEach(() => answer.mockClear());

function item(over: Omit<Partial<AttentionView>, 'detail'> & { detail?: unknown }): AttentionView {
  return { id: 'at-1', task: 'tk-1', kind: 'permission', status: 'pending', title: 'bash: cat feature.txt', detail: {}, created_at: Date.now(), ...over } as AttentionView;
}

describe('AttentionCard', () => {
  it('shows a permission’s command and answers once, always, or reject with a note', async () => {
    render(<AttentionCard item={item({ detail: { permission: 'bash', patterns: ['cat feature.txt'], metadata: { command: 'cat feature.txt' } } })} taskTitle="Add feature.txt" />);
    expect(screen.getAllByText('cat feature.txt').length).toBeGreaterThan(0);
    expect(screen.getByText('Add feature.txt')).toBeTruthy();
    fireEvent.click(screen.getByRole('button', { name: 'Allow once' }));
    await waitFor(() => expect(answer).toHaveBeenCalledWith('at-1', { answer: 'once' }));
    fireEvent.click(screen.getByRole('button', { name: 'Reject…' }));
    fireEvent.change(screen.getByLabelText('Note for the agent (optional)'), { target: { value: 'use the pool' } });
    fireEvent.click(screen.getByRole('button', { name: 'Reject' }));
    await waitFor(() => expect(answer).toHaveBeenCalledWith('at-1', { answer: 'reject', message: 'use the pool' }));
  });
  it('answers a one-choice question in one tap', async () => {
    render(
      <AttentionCard
        item={item({ kind: 'question', detail: { questions: [{ question: 'Which database?', options: [{ label: 'postgres' }, { label: 'mongodb' }] }] } })}
      />,
    );
    fireEvent.click(screen.getByRole('button', { name: /postgres/ }));
    await waitFor(() => expect(answer).toHaveBeenCalledWith('at-1', { answer: 'reply', answers: [['postgres']] }));
  });
  it('sends typed text for a question', async () => {
    render(<AttentionCard item={item({ kind: 'question', detail: { questions: [{ question: 'Name?', options: [] }] } })} />);
    fireEvent.change(screen.getByLabelText('Or type an answer'), { target: { value: 'shop-db' } });
    fireEvent.click(screen.getByRole('button', { name: 'Send answer' }));
    await waitFor(() => expect(answer).toHaveBeenCalledWith('at-1', { answer: 'reply', answers: [['shop-db']] }));
  });
  it('retries or aborts a stalled turn', async () => {
    render(<AttentionCard item={item({ kind: 'stalled', title: 'no event for 600 s' })} />);
    fireEvent.click(screen.getByRole('button', { name: 'Abort' }));
    await waitFor(() => expect(answer).toHaveBeenCalledWith('at-1', { answer: 'abort' }));
  });
});
