import { Type } from '@sinclair/typebox'

const Metadata = Type.Record(Type.String({ maxLength: 64 }), Type.Unknown(), {
  maxProperties: 64,
  description: 'Free-form JSON object, at most 16 KiB serialized',
})
export const METADATA_MAX_BYTES = 16 * 1024

export const CreateSessionBody = Type.Object(
  {
    title: Type.Optional(Type.Union([Type.String({ maxLength: 200 }), Type.Null()])),
    metadata: Type.Optional(Metadata),
  },
  { additionalProperties: false, examples: [{ title: 'Plots', metadata: { team: 'data' } }] },
)

export const PatchSessionBody = Type.Object(
  {
    title: Type.Optional(Type.Union([Type.String({ maxLength: 200 }), Type.Null()])),
    metadata: Type.Optional(Metadata),
  },
  { additionalProperties: false, examples: [{ title: 'Renamed' }] },
)

export const CreatedSession = Type.Object(
  {
    session_id: Type.String(),
    created_at: Type.String(),
    model: Type.String(),
    title: Type.Union([Type.String(), Type.Null()]),
    metadata: Type.Record(Type.String(), Type.Unknown()),
  },
  { description: 'The new session' },
)

export const Session = Type.Object(
  {
    session_id: Type.String(),
    created_at: Type.String(),
    updated_at: Type.String(),
    model: Type.String(),
    title: Type.Union([Type.String(), Type.Null()]),
    metadata: Type.Record(Type.String(), Type.Unknown()),
    message_count: Type.Integer(),
  },
  { description: 'The session' },
)

export const SessionList = Type.Object(
  {
    sessions: Type.Array(
      Type.Object({
        session_id: Type.String(),
        created_at: Type.String(),
        updated_at: Type.String(),
        title: Type.Union([Type.String(), Type.Null()]),
        message_count: Type.Integer(),
      }),
    ),
    next_cursor: Type.Union([Type.String(), Type.Null()]),
  },
  { description: 'A page of sessions, newest first' },
)

export const ListSessionsQuery = Type.Object({
  limit: Type.Integer({ minimum: 1, maximum: 100, default: 20 }),
  cursor: Type.Optional(Type.String({ maxLength: 512 })),
})

export const ListMessagesQuery = Type.Object({
  limit: Type.Integer({ minimum: 1, maximum: 1000, default: 100 }),
  after: Type.Optional(Type.String({ maxLength: 64, description: 'Return messages after this message id' })),
})

export const MessageList = Type.Object(
  { messages: Type.Array(Type.Ref('LmcMessage')), has_more: Type.Boolean() },
  { description: 'A page of messages' },
)
