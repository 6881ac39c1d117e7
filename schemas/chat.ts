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

export const ChatResponse = Type.Object({
  message: Type.Ref('LmcMessage'),
  messages: Type.Array(Type.Ref('LmcMessage')),
  session_id: Type.String(),
  usage: Usage,
})

export const ConfirmBody = Type.Object({ approve: Type.Boolean() }, { additionalProperties: false, examples: [{ approve: true }] })
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

/** OpenAI Chat Completions request: the fields used; anything else is accepted and ignored. */
export const CompletionBody = Type.Object(
  {
    model: Type.Optional(Type.String({ maxLength: 200 })),
    n: nullable(Type.Integer({ minimum: 1 })),
    ...CompletionPassThrough,
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
