import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import type { FastifyRequest } from 'fastify'
import { Type } from '@sinclair/typebox'
import { principal } from '../plugins/auth.js'
import { disconnectSignal, streamRun } from '../plugins/sse.js'
import { CompletionBody, Model, ModelList, Usage } from '../schemas/chat.js'
// the streamed answer's events, for the OpenAPI document
import { CompletionStreamEvent, jsonOrEventStream } from '../schemas/streams.js'
import { protectedErrors } from '../schemas/common.js'
import {
  buildCompletion,
  clientFinishReason,
  clientToolsOf,
  type CompatMessage,
  CompletionChunks,
  completionId,
  fromChatMessages,
  lastAssistantText,
  lastToolCallIds,
  passThroughOf,
  renderContent,
} from '../services/agent/openai-compat.js'
import { ConversationIndex, type Conversations, RedisConversationIndex } from '../services/conversations.js'
import { notFound } from '../services/errors.js'
import type { LmcChunk, LmcInput } from '../schemas/lmc.js'
import { Pending, ToolCall } from '../schemas/chat.js'
import type { ChatResult } from '../services/chat.js'

const ChatCompletion = Type.Object(
  {
    id: Type.String(),
    object: Type.Literal('chat.completion'),
    created: Type.Integer(),
    model: Type.String(),
    choices: Type.Array(
      Type.Object({
        index: Type.Integer(),
        message: Type.Object({
          role: Type.Literal('assistant'),
          content: Type.Union([Type.String(), Type.Null()]),
          refusal: Type.Union([Type.String(), Type.Null()]),
          tool_calls: Type.Optional(Type.Array(ToolCall, { description: "The model's calls to the client's tools; finish_reason is then tool_calls" })),
        }),
        logprobs: Type.Union([Type.Null(), Type.Object({}, { additionalProperties: true })]),
        finish_reason: Type.String(),
      }),
    ),
    usage: Type.Optional(Usage),
    session_id: Type.Optional(Type.String({ description: 'The session this turn ran in (also the X-Session-Id header); send it back to continue' })),
    pending: Type.Optional(Pending),
  },
  { description: 'OpenAI chat.completion; with stream: true, chat.completion.chunk events ending in data: [DONE]' },
)

/**
 * Messages a bound session has not seen yet: what follows the request's last assistant message
 * (new user messages, the results of the tool calls the session returned).
 */
function newInputs(inputs: LmcInput[], sessionHasHistory: boolean): LmcInput[] {
  if (!sessionHasHistory) return inputs
  let last = -1
  inputs.forEach((m, i) => {
    if (m.role === 'assistant') last = i
  })
  return inputs.slice(last + 1)
}

const toolCallKey = (id: string) => `tool_call_id\n${id}`

const openai: FastifyPluginAsyncTypebox = async (app) => {
  // Replicas share the index: a stateless client's next request may reach any of them.
  const conversations: Conversations = app.redis ? new RedisConversationIndex(app.redis, app.log) : new ConversationIndex()
  const created = Math.floor(Date.now() / 1000)
  const modelView = (id: string) => ({ id, object: 'model' as const, created, owned_by: 'oi-server' })

  /**
   * A stateless client's session: the one that produced the last assistant message it resends
   * (known by its tool call ids, or by its text), if it still exists.
   */
  const continuedSession = async (tenantId: string, messages: CompatMessage[]) => {
    const previous = lastAssistantText(messages)
    const [call] = lastToolCallIds(messages)
    const found =
      (call !== undefined ? await conversations.find(tenantId, toolCallKey(call)) : undefined) ??
      (previous === undefined ? undefined : await conversations.find(tenantId, previous))
    return found && (await app.store.getSession(tenantId, found)) ? found : undefined
  }
  /** What a stateless client resends of an answer, remembered to find its session again. */
  const remember = (tenantId: string, content: string, result: ChatResult, sessionId: string) => {
    conversations.remember(tenantId, content, sessionId)
    if (result.pending?.type === 'tool_calls') for (const call of result.pending.tool_calls) conversations.remember(tenantId, toolCallKey(call.id), sessionId)
  }

  /** The session a completion continues, read from the raw body (this runs before validation). */
  const namedSession = async (request: FastifyRequest) => {
    const body = request.body as { session_id?: unknown; metadata?: { session_id?: unknown } | null; messages?: unknown } | null | undefined
    const header = request.headers['x-session-id']
    const named = [body?.session_id, header, body?.metadata?.session_id].find((value) => typeof value === 'string')
    if (typeof named === 'string') return named
    if (!request.principal || !Array.isArray(body?.messages)) return undefined
    try {
      return await continuedSession(request.principal.tenantId, body.messages as CompatMessage[])
    } catch {
      return undefined // malformed messages: validation answers
    }
  }

  app.get(
    '/v1/models',
    { schema: { operationId: 'listModels', tags: ['openai'], summary: 'List models (OpenAI format)', response: { 200: ModelList, ...protectedErrors() } } },
    async () => ({ object: 'list' as const, data: (await app.llm.models()).map(modelView) }),
  )

  app.get(
    '/v1/models/*',
    {
      schema: {
        operationId: 'getModel',
        tags: ['openai'],
        summary: 'Get a model (ids may contain slashes, e.g. bedrock/anthropic.claude-3)',
        // documented as {model} (plugins/swagger.ts): /v1/models/a/b and /v1/models/a%2Fb both reach this route
        params: Type.Object({ '*': Type.String({ title: 'model', description: 'The model id; a slash in it may be sent as is or as %2F' }) }),
        response: { 200: Model, ...protectedErrors(404) },
      },
    },
    async (request) => {
      const id = request.params['*']
      if (!(await app.llm.models()).includes(id)) throw notFound(`Model '${id}'`)
      return modelView(id)
    },
  )

  app.post(
    '/v1/chat/completions',
    {
      config: { sessionRateLimit: true, idempotent: true, sessionOwner: namedSession },
      schema: {
        operationId: 'createChatCompletion',
        tags: ['openai'],
        summary: 'OpenAI-compatible chat completions, with the agent running code',
        description:
          'Bind to a session with `session_id` in the body, the `X-Session-Id` header or `metadata.session_id`; a request without one whose last assistant message is an answer this server gave continues that answer\'s session; otherwise a new session is made. The response carries `X-Session-Id` and `session_id`. The client\'s function `tools` are offered beside the server\'s code tool: a call to one is returned as `tool_calls` with `finish_reason: "tool_calls"`, and the next request with a `tool` message per call resumes the same turn.',
        body: CompletionBody,
        response: { 200: jsonOrEventStream('The completion', ChatCompletion, CompletionStreamEvent), ...protectedErrors(400, 404, 409, 422, 502, 503, 504) },
      },
    },
    async (request, reply) => {
      const { tenantId } = principal(request)
      const body = request.body
      const header = request.headers['x-session-id']
      const messages = body.messages as CompatMessage[]
      const tools = clientToolsOf(body as Parameters<typeof clientToolsOf>[0])
      const conversation = fromChatMessages(messages, new Set(tools?.tools.map((tool) => tool.function.name)))
      const passThrough = passThroughOf(body)
      const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? undefined
      const config = {
        llm: {
          ...(body.model ? { model: body.model } : {}),
          ...(body.temperature != null ? { temperature: body.temperature } : {}),
          ...(maxTokens ? { max_tokens: maxTokens } : {}),
        },
      }
      const sessionId =
        body.session_id ??
        (typeof header === 'string' ? header : undefined) ??
        body.metadata?.session_id ??
        (await continuedSession(tenantId, messages))
      // Resolved here once and handed to the run, which would otherwise read them again; the
      // two reads are independent, so a networked store serves both in the time of one round trip.
      const [session, settings] = await Promise.all([
        app.chat.session(tenantId, sessionId, () => app.sessions.create(tenantId, { model: body.model, metadata: { source: 'chat.completions' } })),
        app.settings.effective(tenantId, config),
      ])
      reply.header('x-session-id', session.id)
      const inputs = newInputs(conversation.inputs, session.messageCount > 0)
      const meta = { id: completionId(), created: Math.floor(Date.now() / 1000), model: body.model ?? settings.model }
      const base = {
        tenantId,
        sessionId: session.id,
        newSession: !sessionId,
        storeOnAnswer: true,
        inputs,
        config,
        settings,
        passThrough,
        systemMessage: conversation.systemMessage,
        ...(tools ? { tools } : {}),
      }

      // Structured output must parse: the content is then the final answer, not the transcript.
      const answerOnly = passThrough.response_format !== undefined && passThrough.response_format.type !== 'text'
      // A turn waiting for tool results has no final answer yet.
      const answer = (result: ChatResult) => (result.pending || typeof result.final.content !== 'string' ? '' : result.final.content)
      const toolCalls = (result: ChatResult) => (result.pending?.type === 'tool_calls' ? result.suspended!.toolCalls : [])
      const extra = (result: ChatResult) => ({ session_id: session.id, ...(result.pending ? { pending: result.pending } : {}) })

      if (!body.stream) {
        const result = await app.chat.run({ ...base, signal: disconnectSignal(reply) })
        const content = answerOnly ? answer(result) : renderContent(result.messages)
        remember(tenantId, content, result, session.id)
        const calls = toolCalls(result)
        return { ...buildCompletion(meta, content, result.usage, clientFinishReason(result.finishReason, calls.length > 0), calls), ...extra(result) }
      }

      const chunks = new CompletionChunks(meta)
      return streamRun(request, reply, {
        hold: true,
        start: (send, started) =>
          app.chat.run({
            ...base,
            onStart: started,
            ...(answerOnly
              ? {}
              : {
                  emit: (lmc: LmcChunk) => {
                    for (const chunk of chunks.push(lmc)) send(chunk)
                  },
                }),
          }),
        stop: () => app.runs.stop(session.id),
        open: (sse) => sse.send({ ...chunks.start(), session_id: session.id }),
        done: (sse, result) => {
          const text = answerOnly ? answer(result) : ''
          if (text) sse.send(chunks.content(text))
          const calls = toolCalls(result)
          for (const chunk of chunks.toolCalls(calls)) sse.send(chunk)
          remember(tenantId, chunks.text, result, session.id)
          for (const chunk of chunks.finish(clientFinishReason(result.finishReason, calls.length > 0))) sse.send({ ...chunk, ...(result.pending ? { pending: result.pending } : {}) })
          if (body.stream_options?.include_usage) sse.send(chunks.usage(result.usage))
        },
        error: (sse, body) => {
          for (const chunk of chunks.interrupt()) sse.send(chunk)
          sse.send(body)
        },
        end: (sse) => sse.data('[DONE]'),
      })
    },
  )
}

export default openai
