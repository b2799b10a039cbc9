import { afterEach, describe, expect, it } from 'vitest';
import { cleanup, render, screen } from '@testing-library/react';
import { TaskCard, actionsFor } from './TaskCard';
import { task } from '../test/fixtures';

afterEach(cleanup);

describe('TaskCard', () => {
  it('shows branch, state, progress, files, cost, badge and queue position', () => {
    render(<TaskCard task={task({ state: 'queued', queue_position: 2, todos_done: 1, todos_total: 4, percent: 25, files: ['a', 'b'], cost: 0.1234, pending: 1 })} />);
    expect(screen.getByText('Add feature.txt')).toBeTruthy();
    expect(screen.getByText('atelier/tk-0000000001-add-feature-txt')).toBeTruthy();
    expect(screen.getByTestId('state').textContent).toBe('queued');
    expect(screen.getByRole('progressbar').getAttribute('aria-valuenow')).toBe('25');
    expect(screen.getByText('1/4 · 25%')).toBeTruthy();
    expect(screen.getByText('2 files')).toBeTruthy();
    expect(screen.getByText('$0.12')).toBeTruthy();
    expect(screen.getByText('#2 in queue')).toBeTruthy();
    expect(screen.getByLabelText('1 waiting for you')).toBeTruthy();
    expect(screen.getByRole('button', { name: 'Cancel' })).toBeTruthy();
  });
  it('offers the actions the state allows', () => {
    expect(actionsFor({ state: 'backlog' })).toEqual(['start', 'cancel']);
    expect(actionsFor({ state: 'review' })).toEqual(['done', 'cancel']);
    expect(actionsFor({ state: 'failed' })).toEqual(['retry']);
    expect(actionsFor({ state: 'done' })).toEqual([]);
  });
});
