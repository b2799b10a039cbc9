// Names for the generated schema types (src/api/schema.d.ts, from docs/openapi.json).
import type { components } from './schema';

type S = components['schemas'];
export type TaskView = S['TaskView'];
export type TaskDetail = S['TaskDetail'];
export type TaskState = S['TaskState'];
export type TodoView = S['TodoView'];
export type AttentionView = S['AttentionView'];
export type AttentionKind = S['AttentionKind'];
export type Answer = S['Answer'];
export type Effort = S['Effort'];
export type TaskTemplate = S['TaskTemplate'];
export type WorkspaceView = S['WorkspaceView'];
export type SandboxView = S['SandboxView'];
export type SandboxState = S['SandboxState'];
export type PrebuildView = S['PrebuildView'];
export type SecretView = S['SecretView'];
export type DevView = S['DevView'];
export type AtelierEvent = S['Event'];
export type ApiErrorBody = S['ApiErrorBody'];
export type Conversation = S['Conversation'];
export type MessageView = S['MessageView'];
export type ToolCallView = S['ToolCallView'];
