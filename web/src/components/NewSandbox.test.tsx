import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { cleanup, fireEvent, render, screen, waitFor } from '@testing-library/react';

const createSandbox = vi.fn(async (_body: unknown) => ({ id: 'sb-0000000001' }));
vi.mock('../api/actions', () => ({ createSandbox: (b: unknown) => createSandbox(b) }));
const { NewSandbox, NewDev } = await import('./NewSandbox');

afterEach(cleanup);
beforeEach(() => createSandbox.mockClear());

describe('NewSandbox', () => {
  it('creates from a workspace by name only, then opens the sandbox', async () => {
    const opened = vi.fn();
    render(<NewSandbox workspaces={['shop']} images={['minimal']} onCreated={opened} />);
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'demo' } });
    fireEvent.click(screen.getByRole('button', { name: 'Create sandbox' }));
    await waitFor(() => expect(opened).toHaveBeenCalledWith('sb-0000000001'));
    expect(createSandbox).toHaveBeenCalledWith({ name: 'demo', workspace: 'shop' });
  });
  it('creates from an image with a shape', async () => {
    render(<NewSandbox workspaces={['shop']} images={['minimal']} onCreated={() => {}} />);
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'raw' } });
    fireEvent.change(screen.getByLabelText('From'), { target: { value: 'img:minimal' } });
    fireEvent.change(screen.getByLabelText('vCPUs'), { target: { value: '1' } });
    fireEvent.change(screen.getByLabelText('Memory (MiB)'), { target: { value: '512' } });
    fireEvent.click(screen.getByRole('button', { name: 'Create sandbox' }));
    await waitFor(() =>
      expect(createSandbox).toHaveBeenCalledWith({ name: 'raw', workspace: null, image: 'minimal', vcpus: 1, memory_mib: 512 }),
    );
  });
  it('says what is wrong with a name before asking the manager, and shows its errors', async () => {
    render(<NewSandbox workspaces={['shop']} images={[]} onCreated={() => {}} />);
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'Bad_Name' } });
    fireEvent.click(screen.getByRole('button', { name: 'Create sandbox' }));
    expect((await screen.findByRole('alert')).textContent).toContain('lowercase');
    expect(createSandbox).not.toHaveBeenCalled();
    createSandbox.mockRejectedValueOnce(new Error('no ready prebuild of shop'));
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'ok' } });
    fireEvent.click(screen.getByRole('button', { name: 'Create sandbox' }));
    await waitFor(() => expect(screen.getByRole('alert').textContent).toContain('no ready prebuild'));
  });
});

describe('NewDev', () => {
  it('starts a command with a port, or refuses a bad port', async () => {
    const start = vi.fn(async () => {});
    render(<NewDev onStart={start} />);
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'web' } });
    fireEvent.change(screen.getByLabelText('Command'), { target: { value: 'npm run dev' } });
    fireEvent.change(screen.getByLabelText('Port (optional)'), { target: { value: '70000' } });
    fireEvent.click(screen.getByRole('button', { name: 'Start' }));
    expect((await screen.findByRole('alert')).textContent).toContain('port');
    expect(start).not.toHaveBeenCalled();
    fireEvent.change(screen.getByLabelText('Port (optional)'), { target: { value: '3000' } });
    fireEvent.click(screen.getByRole('button', { name: 'Start' }));
    await waitFor(() => expect(start).toHaveBeenCalledWith({ name: 'web', command: 'npm run dev', port: 3000 }));
  });
});
