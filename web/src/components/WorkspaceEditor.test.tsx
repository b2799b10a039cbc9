import { afterEach, describe, expect, it, vi } from 'vitest';
import { cleanup, fireEvent, render, screen, waitFor } from '@testing-library/react';
import { WorkspaceEditor } from './WorkspaceEditor';
import type { WorkspaceSpec } from '../lib/workspaceForm';

afterEach(cleanup);

const SPEC: WorkspaceSpec = {
  name: 'shop',
  image: 'minimal',
  resources: { vcpus: 2, memory_mib: 1024, disk_gib: 4 },
  repos: [{ url: 'https://example.com/a.git', path: '/workspace/a' }],
};

describe('WorkspaceEditor', () => {
  it('shows the manager’s validation error at the field it names', async () => {
    const save = vi.fn(async () => ({ message: 'path must be absolute', field: 'repos[0].path' }));
    render(<WorkspaceEditor spec={SPEC} save={save} />);
    fireEvent.change(screen.getByLabelText('Guest path'), { target: { value: 'relative' } });
    fireEvent.click(screen.getByRole('button', { name: 'Save' }));
    const alert = await screen.findByRole('alert');
    expect(alert.textContent).toBe('path must be absolute');
    const input = screen.getByLabelText('Guest path');
    expect(input.getAttribute('aria-invalid')).toBe('true');
    expect(input.getAttribute('aria-describedby')).toBe(alert.id);
    expect(save).toHaveBeenCalledWith(expect.objectContaining({ repos: [{ url: 'https://example.com/a.git', path: 'relative' }] }));
  });
  it('catches a bad number before sending, at its field', async () => {
    const save = vi.fn(async () => null);
    render(<WorkspaceEditor spec={SPEC} save={save} />);
    fireEvent.change(screen.getByLabelText('vCPUs (1–8)'), { target: { value: 'two' } });
    fireEvent.click(screen.getByRole('button', { name: 'Save' }));
    await screen.findByRole('alert');
    expect(screen.getByLabelText('vCPUs (1–8)').getAttribute('aria-invalid')).toBe('true');
    expect(save).not.toHaveBeenCalled();
  });
  it('keeps the same input while typing (no remount, so focus stays)', () => {
    render(<WorkspaceEditor spec={SPEC} save={vi.fn(async () => null)} />);
    const input = screen.getByLabelText('URL');
    fireEvent.change(input, { target: { value: 'https://example.com/b.git' } });
    expect(screen.getByLabelText('URL')).toBe(input);
    expect(document.contains(input)).toBe(true);
  });
  it('saves and reports it', async () => {
    const save = vi.fn(async () => null);
    const saved = vi.fn();
    render(<WorkspaceEditor spec={SPEC} save={save} onSaved={saved} />);
    fireEvent.click(screen.getByRole('button', { name: 'Save' }));
    await waitFor(() => expect(saved).toHaveBeenCalled());
  });
});
