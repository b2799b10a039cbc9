import { describe, expect, it } from 'vitest';
import { FieldError, formField, fromForm, toForm, type WorkspaceSpec } from './workspaceForm';

const SPEC: WorkspaceSpec = {
  name: 'shop',
  image: 'minimal-opencode',
  resources: { vcpus: 2, memory_mib: 1536, disk_gib: 2 },
  repos: [{ url: 'git://public.test/demo.git', branch: 'main', path: '/workspace/shop', credentials: null, push_url: 'git://198.18.0.1/demo.git' }],
  init: ['make deps', 'make build'],
  dev: [],
  egress: { allow: ['public.test', '*.pypi.org'] },
  opencode: { model: 'local/scripted' } as unknown as WorkspaceSpec['opencode'],
  opencode_keys: { local: 'model-key' },
};

describe('the workspace form', () => {
  it('round-trips a definition', () => {
    const f = toForm(SPEC);
    expect(f.vcpus).toBe('2');
    expect(f.egress).toBe('allow');
    expect(f.allow).toBe('public.test, *.pypi.org');
    expect(f.init).toBe('make deps\nmake build');
    expect(JSON.parse(f.other)).toEqual({ dev: [], opencode: { model: 'local/scripted' }, opencode_keys: { local: 'model-key' } });
    const back = fromForm(f);
    expect(back).toEqual({
      ...SPEC,
      repos: [{ url: 'git://public.test/demo.git', branch: 'main', path: '/workspace/shop', push_url: 'git://198.18.0.1/demo.git' }],
    });
  });
  it('leaves empty numbers to the defaults and names a bad one', () => {
    const f = { ...toForm(SPEC), vcpus: '', disk_gib: 'ten' };
    expect(() => fromForm(f)).toThrow(FieldError);
    try {
      fromForm(f);
    } catch (e) {
      expect((e as FieldError).field).toBe('resources.disk_gib');
    }
    expect(fromForm({ ...f, disk_gib: '' }).resources).toEqual({ memory_mib: 1536 });
  });
  it('refuses other JSON that is not an object or repeats a form field', () => {
    expect(() => fromForm({ ...toForm(SPEC), other: '[1]' })).toThrow(/not a JSON object/);
    expect(() => fromForm({ ...toForm(SPEC), other: '{"image": "x"}' })).toThrow(/own field/);
  });
  it('puts a server error at its field', () => {
    expect(formField('repos[1].path')).toBe('repos[1].path');
    expect(formField('repos[0]')).toBe('repos[0].url');
    expect(formField('resources.vcpus')).toBe('resources.vcpus');
    expect(formField('init[3]')).toBe('init');
    expect(formField('egress.allow[0]')).toBe('egress');
    expect(formField('dev[0].name')).toBe('other');
    expect(formField('secrets.env.TOKEN')).toBe('other');
    expect(formField('image')).toBe('image');
    expect(formField(null)).toBeNull();
  });
});
