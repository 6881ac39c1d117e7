import { type Static, type TSchema, Type } from '@sinclair/typebox'

/**
 * OpenAI's Responses API on the wire (API reference "Responses", openai-node
 * `resources/responses/responses.d.ts`). Request fields are checked for their types here; what
 * they mean, and which values are refused, is services/responses.ts's business. Unknown fields
 * are accepted and ignored, as on the Chat Completions route.
 */

const nullable = <T extends TSchema>(schema: T) => Type.Optional(Type.Union([schema, Type.Null()]))

const Item = Type.Object({}, { additionalProperties: true, description: 'An input item: a message, an earlier output item, or a function_call_output' })

export const Tool = Type.Object(
  { type: Type.String({ description: '`code_interpreter` or `function`' }) },
  { additionalProperties: true, description: 'A tool the model may use' },
)

export const TextFormat = Type.Object(
  {
    type: Type.Union([Type.Literal('text'), Type.Literal('json_object'), Type.Literal('json_schema')]),
    name: Type.Optional(Type.String({ maxLength: 64 })),
    schema: Type.Optional(Type.Object({}, { additionalProperties: true })),
    description: Type.Optional(Type.String()),
    strict: nullable(Type.Boolean()),
  },
  { additionalProperties: true },
)

export const ResponseCreateBody = Type.Object(
  {
    model: Type.Optional(Type.String({ maxLength: 200 })),
    // The array first: with coerceTypes 'array' a one-element array would otherwise become a string.
    input: Type.Optional(Type.Union([Type.Array(Item, { maxItems: 1000 }), Type.String({ maxLength: 1_000_000 })])),
    instructions: nullable(Type.String({ maxLength: 1_000_000 })),
    temperature: nullable(Type.Number({ minimum: 0, maximum: 2 })),
    top_p: nullable(Type.Number({ minimum: 0, maximum: 1 })),
    max_output_tokens: nullable(Type.Integer({ minimum: 1 })),
    tools: Type.Optional(Type.Array(Tool, { maxItems: 128 })),
    tool_choice: Type.Optional(Type.Union([Type.String(), Type.Object({ type: Type.String() }, { additionalProperties: true })])),
    parallel_tool_calls: nullable(Type.Boolean()),
    text: nullable(Type.Object({ format: Type.Optional(TextFormat) }, { additionalProperties: true })),
    metadata: nullable(
      Type.Record(Type.String(), Type.String({ maxLength: 512 }), {
        maxProperties: 16,
        propertyNames: { maxLength: 64 },
        description: 'Up to 16 pairs: keys of at most 64 characters, string values of at most 512',
      }),
    ),
    store: nullable(Type.Boolean()),
    background: nullable(Type.Boolean()),
    previous_response_id: nullable(Type.String({ maxLength: 200 })),
    stream: nullable(Type.Boolean()),
    user: Type.Optional(Type.String({ maxLength: 256 })),
  },
  {
    additionalProperties: true,
    examples: [{ model: 'gpt-4o-mini', input: 'What is 2**100?', tools: [{ type: 'code_interpreter', container: { type: 'auto' } }] }],
  },
)
export type ResponseCreateBody = Static<typeof ResponseCreateBody>

export const ResponseIdParams = Type.Object({ id: Type.String({ description: 'The response id (`resp_…`)', maxLength: 200 }) })

export const InputItemsQuery = Type.Object({
  limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 100, default: 20 })),
  order: Type.Optional(Type.Union([Type.Literal('asc'), Type.Literal('desc')], { default: 'desc' })),
  after: Type.Optional(Type.String({ maxLength: 200, description: 'An item id: list the items after it' })),
})
export type InputItemsQuery = Static<typeof InputItemsQuery>

const Usage = Type.Object(
  {
    input_tokens: Type.Integer(),
    input_tokens_details: Type.Object({ cached_tokens: Type.Integer() }, { additionalProperties: true }),
    output_tokens: Type.Integer(),
    output_tokens_details: Type.Object({ reasoning_tokens: Type.Integer() }, { additionalProperties: true }),
    total_tokens: Type.Integer(),
  },
  { additionalProperties: true },
)

const OutputItem = Type.Object(
  { id: Type.String(), type: Type.String({ description: '`message`, `code_interpreter_call` or `function_call`' }) },
  { additionalProperties: true, description: 'An output item (OpenAI wire format)' },
)

/** The Response object. Only its frame is declared: items keep every field they have. */
export const ResponseObject = Type.Object(
  {
    id: Type.String(),
    object: Type.Literal('response'),
    created_at: Type.Integer(),
    status: Type.String({ description: '`queued`, `in_progress`, `completed`, `incomplete`, `failed` or `cancelled`' }),
    output: Type.Array(OutputItem),
    usage: Type.Union([Usage, Type.Null()]),
    error: Type.Union([Type.Object({ code: Type.String(), message: Type.String() }, { additionalProperties: true }), Type.Null()]),
    incomplete_details: Type.Union([Type.Object({ reason: Type.String() }), Type.Null()]),
  },
  { additionalProperties: true, title: 'Response', description: 'An OpenAI Response; with stream: true, Responses stream events' },
)

export type ResponseObject = Static<typeof ResponseObject>

export const ResponseDeleted = Type.Object(
  { id: Type.String(), object: Type.Literal('response'), deleted: Type.Literal(true) },
  { description: 'The response was deleted' },
)

export const InputItemList = Type.Object({
  object: Type.Literal('list'),
  data: Type.Array(Type.Object({ id: Type.String(), type: Type.String() }, { additionalProperties: true })),
  first_id: Type.Union([Type.String(), Type.Null()]),
  last_id: Type.Union([Type.String(), Type.Null()]),
  has_more: Type.Boolean(),
}, { description: 'The input items, one page' })

/** For the OpenAPI document: what `stream: true` sends (written by plugins/sse.ts). */
export const ResponseStreamEvent = Type.Union(
  [
    Type.Object(
      {
        event: Type.String({ description: 'The event type again, e.g. `response.output_text.delta`' }),
        data: Type.Object({ type: Type.String(), sequence_number: Type.Integer() }, { additionalProperties: true }),
      },
      { description: 'One Responses stream event; `response.created` first, `response.completed`, `response.incomplete` or `response.failed` last' },
    ),
    Type.Object(
      {
        event: Type.Literal('error'),
        data: Type.Object({
          type: Type.Literal('error'),
          sequence_number: Type.Integer(),
          code: Type.String(),
          message: Type.String(),
          param: Type.Union([Type.String(), Type.Null()]),
        }),
      },
      { description: 'A fault of the server outside the response (a failed turn ends with response.failed instead); the stream ends' },
    ),
  ],
  { title: 'Responses stream event' },
)
