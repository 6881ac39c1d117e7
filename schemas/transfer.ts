import { Type } from '@sinclair/typebox'
import { LmcMessage } from './lmc.js'
import { Settings } from './settings.js'

/**
 * A session export (services/transfer.ts), as `GET /v1/sessions/{id}/export` gives it and
 * `POST /v1/sessions/import` takes it back. Import reads `session`, `messages` and `events`;
 * `settings` is a record of what the session used and is not applied.
 */
export const SessionExport = Type.Object(
  {
    format: Type.Literal('oi-server.session'),
    version: Type.Literal(1),
    exported_at: Type.String({ format: 'date-time' }),
    session: Type.Object({
      id: Type.String({ maxLength: 128 }),
      title: Type.Union([Type.String({ maxLength: 200 }), Type.Null()]),
      metadata: Type.Record(Type.String({ maxLength: 64 }), Type.Unknown(), { maxProperties: 64 }),
      model: Type.String({ minLength: 1, maxLength: 200 }),
      created_at: Type.String({ format: 'date-time' }),
    }),
    settings: Type.Optional(Type.Union([Settings, Type.Record(Type.String(), Type.Unknown())])),
    messages: Type.Array(Type.Ref(LmcMessage), { maxItems: 100_000 }),
    events: Type.Array(
      Type.Object({
        id: Type.Integer({ minimum: 1 }),
        type: Type.String({ minLength: 1, maxLength: 64, pattern: '^[a-z_]+$' }),
        created_at: Type.String({ format: 'date-time' }),
        data: Type.Unknown(),
      }),
      { maxItems: 1_000_000 },
    ),
    kernel_state: Type.Literal('not_exported', { description: 'Kernel state (variables, imports) is never exported' }),
  },
  {
    title: 'Session export',
    examples: [
{
        format: 'oi-server.session',
        version: 1,
        exported_at: '2026-01-02T03:04:05.000Z',
        session: { id: '0b9a3f2e-5c1d-4e8f-9a7b-1c2d3e4f5a6b', title: 'Plots', metadata: {}, model: 'gpt-4o-mini', created_at: '2026-01-02T03:00:00.000Z' },
        messages: [{ id: '7d1e2f3a-4b5c-4d6e-8f90-a1b2c3d4e5f6', role: 'user', type: 'message', content: 'Plot y = x^2', created_at: '2026-01-02T03:00:01.000Z' }],
        events: [],
        kernel_state: 'not_exported',
      },
    ],
  },
)

export const ExportQuery = Type.Object({
  workspace: Type.Boolean({ default: false, description: 'Answer a zip holding session.json and the workspace under workspace/' }),
})
