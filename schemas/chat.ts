import { type TSchema, Type } from '@sinclair/typebox'
import { LmcInput } from './lmc.js'
import { RunConfig } from './settings.js'

export const Usage = Type.Object({
  prompt_tokens: Type.Integer(),
  completion_tokens: Type.Integer(),
  total_tokens: Type.Integer(),
})

export const ChatBody = Type.Object(
  {
    messages: Type.Array(LmcInput, { minItems: 1, maxItems: 1000 }),
    session_id: Type.Optional(Type.String({ maxLength: 64 })),
    stream: Type.Optional(Type.Boolean({ default: false })),
    config: Type.Optional(RunConfig),
  },
  { additionalProperties: false, examples: [{ messages: [{ role: 'user', type: 'message', content: 'Hello!' }] }] },
)

/** One of the client's tool calls, as OpenAI's `tool_calls[]`. */
export const ToolCall = Type.Object({
  id: Type.String(),
  type: Type.Literal('function'),
  function: Type.Object({ name: Type.String(), arguments: Type.String({ description: 'JSON text of the arguments' }) }),
})

/** What a suspended turn waits for (services/chat.ts `Pending`). */
export const Pending = Type.Union(
  [
    Type.Object(
      {
        type: Type.Literal('confirmation'),
        message_id: Type.String({ description: 'The assistant code message asking to run' }),
        language: Type.String(),
        code: Type.String(),
      },
      { description: 'auto_run is false: approve or decline with POST /v1/sessions/{id}/confirm, a WebSocket confirm frame, or a chat request whose only message is {"role":"user","type":"confirmation","content":{"approve":true}}' },
    ),
    Type.Object(
      { type: Type.Literal('tool_calls'), tool_calls: Type.Array(ToolCall) },
      { description: "The model called the client's tools: send one tool result per id in the next chat request" },
    ),
  ],
  { title: 'Pending', description: 'The turn is suspended, waiting for its client; absent when the turn ended' },
)

export const ChatResponse = Type.Object({
  message: Type.Ref('LmcMessage'),
  messages: Type.Array(Type.Ref('LmcMessage')),
  session_id: Type.String(),
  usage: Usage,
  pending: Type.Optional(Pending),
})

export const ConfirmBody = Type.Object(
  { approve: Type.Boolean(), stream: Type.Optional(Type.Boolean({ default: false, description: 'Answer with the resumed turn as an event stream, as POST /v1/chat does' })) },
  { additionalProperties: false, examples: [{ approve: true }] },
)
export const Ack = Type.Object({ ok: Type.Boolean(), detail: Type.Optional(Type.String()) }, { description: 'Done, or ok: false with the reason' })

const nullable = <T extends TSchema>(schema: T) => Type.Optional(Type.Union([schema, Type.Null()]))

/**
 * Fields of a Chat Completions request passed to every upstream call of the turn as they are
 * (the README's request table says what happens to each field).
 */
const CompletionPassThrough = {
  // The array first: with coerceTypes 'array' a one-element array would otherwise become its string.
  stop: nullable(Type.Union([Type.Array(Type.String(), { maxItems: 4 }), Type.String()])),
  seed: nullable(Type.Integer()),
  top_p: nullable(Type.Number({ minimum: 0, maximum: 1 })),
  presence_penalty: nullable(Type.Number({ minimum: -2, maximum: 2 })),
  frequency_penalty: nullable(Type.Number({ minimum: -2, maximum: 2 })),
  logit_bias: nullable(Type.Record(Type.String(), Type.Number({ minimum: -100, maximum: 100 }))),
  user: Type.Optional(Type.String({ maxLength: 256 })),
  logprobs: nullable(Type.Boolean()),
  top_logprobs: nullable(Type.Integer({ minimum: 0, maximum: 20 })),
  response_format: nullable(
    Type.Object({ type: Type.Union([Type.Literal('text'), Type.Literal('json_object'), Type.Literal('json_schema')]) }, { additionalProperties: true }),
  ),
}

/** The client's tools; checked field by field in services/agent/openai-compat.ts so a 400 names the exact `param`. */
const CompletionTools = {
  tools: nullable(
    Type.Array(Type.Unknown(), {
      maxItems: 128,
      description: "Function tools offered to the model beside the server's `execute` tool; a call to one is returned as `tool_calls` and the turn waits for its result",
    }),
  ),
  tool_choice: nullable(Type.Unknown({ description: '"none", "auto", "required" or {"type":"function","function":{"name"}}; sent upstream' })),
  parallel_tool_calls: nullable(Type.Boolean({ description: 'Sent upstream when there are tools' })),
}

/** OpenAI Chat Completions request: the fields used; anything else is accepted and ignored. */
export const CompletionBody = Type.Object(
  {
    model: Type.Optional(Type.String({ maxLength: 200 })),
    n: nullable(Type.Integer({ minimum: 1 })),
    ...CompletionPassThrough,
    ...CompletionTools,
    messages: Type.Array(Type.Object({ role: Type.String() }, { additionalProperties: true }), { minItems: 1, maxItems: 1000 }),
    stream: Type.Optional(Type.Union([Type.Boolean(), Type.Null()])),
    stream_options: Type.Optional(Type.Union([Type.Object({ include_usage: Type.Optional(Type.Boolean()) }, { additionalProperties: true }), Type.Null()])),
    temperature: Type.Optional(Type.Union([Type.Number({ minimum: 0, maximum: 2 }), Type.Null()])),
    max_tokens: Type.Optional(Type.Union([Type.Integer({ minimum: 1 }), Type.Null()])),
    max_completion_tokens: Type.Optional(Type.Union([Type.Integer({ minimum: 1 }), Type.Null()])),
    session_id: Type.Optional(Type.String({ maxLength: 64 })),
    metadata: Type.Optional(
      Type.Union([Type.Object({ session_id: Type.Optional(Type.String({ maxLength: 64 })) }, { additionalProperties: true }), Type.Null()]),
    ),
  },
  { additionalProperties: true, examples: [{ messages: [{ role: 'user', content: 'Hello!' }] }] },
)

export const Model = Type.Object({
  id: Type.String(),
  object: Type.Literal('model'),
  created: Type.Integer(),
  owned_by: Type.String(),
}, { description: 'The model' })
export const ModelList = Type.Object({ object: Type.Literal('list'), data: Type.Array(Model) }, { description: 'The models' })
