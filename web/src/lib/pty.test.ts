import { describe, expect, it } from 'vitest';
import { backoffMs, streamUrl } from '../api/events';
import { parseServerFrame, ptyUrl, resizeFrame, startFrame } from './pty';

describe('pty framing', () => {
  it('starts a login shell with the terminal size', () => {
    expect(JSON.parse(startFrame(30, 100))).toEqual({ type: 'start', command: [], env: {}, cwd: null, rows: 30, cols: 100, term: 'xterm-256color' });
    expect(JSON.parse(resizeFrame(40, 120))).toEqual({ type: 'resize', rows: 40, cols: 120 });
  });
  it('reads control frames and ignores the rest', () => {
    expect(parseServerFrame('{"type":"exit","code":0,"signal":null}')).toEqual({ type: 'exit', code: 0, signal: null });
    expect(parseServerFrame('{"type":"other"}')).toBeNull();
    expect(parseServerFrame('not json')).toBeNull();
  });
  it('uses wss on https pages', () => {
    expect(ptyUrl('sb-1', { protocol: 'https:', host: 'a.example' })).toBe('wss://a.example/api/v1/sandboxes/sb-1/pty');
    expect(ptyUrl('sb-1', { protocol: 'http:', host: '127.0.0.1:7070' })).toBe('ws://127.0.0.1:7070/api/v1/sandboxes/sb-1/pty');
  });
});

describe('event stream reconnect', () => {
  it('backs off from 1 s doubling to 30 s', () => {
    const mid = () => 0.5;
    expect(backoffMs(1, mid)).toBe(1000);
    expect(backoffMs(2, mid)).toBe(2000);
    expect(backoffMs(5, mid)).toBe(16000);
    expect(backoffMs(9, mid)).toBe(30000);
  });
  it('resumes after the last id seen', () => {
    expect(streamUrl(null)).toBe('/api/v1/events');
    expect(streamUrl(42)).toBe('/api/v1/events?last_event_id=42');
  });
});
