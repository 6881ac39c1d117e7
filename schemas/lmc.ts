import { type Static, Type } from '@sinclair/typebox'

/**
 * Open Interpreter's message format (LMC), plus two types for the client's own function tools:
 * `tool_call` (assistant; content `{id, name, arguments}`, as in OpenAI's `tool_calls[]`) and
 * `tool_result` (computer; content `{tool_call_id, content}`, as in OpenAI's `tool` message).
 */
export const LmcRole = Type.Union([Type.Literal('user'), Type.Literal('assistant'), Type.Literal('computer')])
export const LmcType = Type.Union([
  Type.Literal('message'),
  Type.Literal('code'),
  Type.Literal('image'),
  Type.Literal('console'),
  Type.Literal('file'),
  Type.Literal('confirmation'),
  Type.Literal('tool_call'),
  Type.Literal('tool_result'),
])
export const LmcFormat = Type.Union([
  Type.Literal('text'),
  Type.Literal('python'),
  Type.Literal('javascript'),
  Type.Literal('shell'),
  Type.Literal('html'),
  Type.Literal('path'),
  Type.Literal('base64.png'),
  Type.Literal('base64.jpeg'),
  Type.Literal('output'),
  Type.Literal('active_line'),
  Type.Literal('execution'),
])

export const LmcMessage = Type.Object(
  {
    id: Type.String({ format: 'uuid' }),
    role: LmcRole,
    type: LmcType,
    format: Type.Optional(LmcFormat),
    content: Type.Union([Type.String(), Type.Record(Type.String(), Type.Unknown())]),
    recipient: Type.Optional(Type.Union([Type.Literal('user'), Type.Literal('assistant')])),
    /** For console output: which stream it came from (stdout and stderr are kept apart). */
    stream: Type.Optional(Type.Union([Type.Literal('stdout'), Type.Literal('stderr')])),
    created_at: Type.String({ format: 'date-time' }),
  },
  { $id: 'LmcMessage', title: 'LMC message' },
)
export type LmcMessage = Static<typeof LmcMessage>

/** What a client sends: id and created_at are assigned by the server. */
export const LmcInput = Type.Object(
  {
    role: LmcRole,
    type: Type.Optional(LmcType),
    format: Type.Optional(LmcFormat),
    content: Type.Union([Type.String({ maxLength: 1_000_000 }), Type.Record(Type.String(), Type.Unknown())]),
    recipient: Type.Optional(Type.Union([Type.Literal('user'), Type.Literal('assistant')])),
  },
  { additionalProperties: true },
)
export type LmcInput = Static<typeof LmcInput>

/** A streaming chunk: a start boundary, a content piece, or an end boundary of one LMC message. */
export interface LmcChunk {
  id: string
  role: LmcMessage['role']
  type: LmcMessage['type']
  format?: LmcMessage['format']
  stream?: 'stdout' | 'stderr'
  recipient?: 'user' | 'assistant'
  /** A number only in an `active_line` chunk (the running line), which is never stored. */
  content?: LmcMessage['content'] | number
  start?: true
  end?: true
  created_at: string
}
