import { type TSchema, Type } from '@sinclair/typebox'
import { ErrorResponse } from './common.js'
import { LmcFormat, LmcRole, LmcType } from './lmc.js'
import { Pending, Usage } from './chat.js'

/**
 * What the `text/event-stream` answers carry, for the OpenAPI document only (the streams are
 * written by plugins/sse.ts, never serialized through these). One schema describes one event as
 * its `event:` name and the JSON of its `data:` line.
 */

/** A piece of an LMC message: a start boundary, a content piece or an end boundary (the LmcChunk type). */
export const LmcChunk = Type.Object(
  {
    id: Type.String({ description: 'The id of the LMC message this piece belongs to' }),
    role: LmcRole,
    type: LmcType,
    format: Type.Optional(LmcFormat),
    stream: Type.Optional(Type.Union([Type.Literal('stdout'), Type.Literal('stderr')])),
    recipient: Type.Optional(Type.Union([Type.Literal('user'), Type.Literal('assistant')])),
    content: Type.Optional(Type.Union([Type.String(), Type.Record(Type.String(), Type.Unknown())])),
    start: Type.Optional(Type.Literal(true)),
    end: Type.Optional(Type.Literal(true)),
    created_at: Type.String(),
  },
  { title: 'LMC chunk' },
)

/** One named server-sent event. */
export const sseEvent = (event: string, data: TSchema, description: string) =>
  Type.Object({ event: Type.Literal(event), data }, { description })

export const ErrorEvent = sseEvent('error', Type.Ref(ErrorResponse), 'The run failed after the stream opened; the stream ends')

/** The 200 answer of a route that answers JSON, or a stream with `stream: true`. */
export const jsonOrEventStream = <J extends TSchema, E extends TSchema>(description: string, json: J, events: E) => ({
  description,
  content: { 'application/json': { schema: json }, 'text/event-stream': { schema: events } },
})

export const ChatStreamEvent = Type.Union(
  [
    sseEvent('message', LmcChunk, 'A piece of an LMC message as it is produced (code, console output, the answer)'),
    ErrorEvent,
    sseEvent(
      'done',
      Type.Object({ session_id: Type.String(), usage: Usage, stopped: Type.Boolean({ description: 'The run was cancelled' }), pending: Type.Optional(Pending) }),
      'The turn ended, or is suspended waiting for its client (`pending`); the stream ends',
    ),
  ],
  { title: 'Chat stream event', description: 'With `stream: true`: `event: message` pieces, then `event: done` (or `event: error`). A `: ping` comment comes every 15 s.' },
)

const CompletionChunk = Type.Object(
  {
    id: Type.String(),
    object: Type.Literal('chat.completion.chunk'),
    created: Type.Integer(),
    model: Type.String(),
    choices: Type.Array(
      Type.Object({
        index: Type.Integer(),
        delta: Type.Object({ role: Type.Optional(Type.Literal('assistant')), content: Type.Optional(Type.String()) }),
        logprobs: Type.Null(),
        finish_reason: Type.Union([Type.String(), Type.Null()]),
      }),
    ),
    usage: Type.Optional(Usage),
  },
  { title: 'chat.completion.chunk' },
)

export const CompletionStreamEvent = Type.Union(
  [
    Type.Object({ data: CompletionChunk }, { description: 'A chunk; the first carries the role, the last a finish_reason; with stream_options.include_usage a last one has usage and no choices' }),
    Type.Object({ data: Type.Ref(ErrorResponse) }, { description: 'The run failed after the stream opened' }),
    Type.Object({ data: Type.Literal('[DONE]') }, { description: 'The end of the stream (not JSON)' }),
  ],
  { title: 'Chat completion stream event', description: 'With `stream: true`: `data:` lines only (no event names), as OpenAI sends them, ending with `data: [DONE]`.' },
)
