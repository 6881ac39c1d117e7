import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import type { FastifyRequest } from 'fastify'
import { principal } from '../plugins/auth.js'
import { disconnectSignal, streamRun } from '../plugins/sse.js'
import { Ack, ChatBody, ChatResponse, ConfirmBody } from '../schemas/chat.js'
import { protectedErrors, SessionIdParams } from '../schemas/common.js'
import { ChatStreamEvent, jsonOrEventStream } from '../schemas/streams.js'
import type { ChatResult } from '../services/chat.js'

/** The JSON answer of a turn; `pending` when it is suspended, waiting for its client. */
const turnAnswer = (sessionId: string, result: ChatResult) => ({
  message: result.final,
  messages: result.messages,
  session_id: sessionId,
  usage: result.usage,
  ...(result.pending ? { pending: result.pending } : {}),
})

const doneEvent = (sessionId: string, result: ChatResult) => ({
  session_id: sessionId,
  usage: result.usage,
  stopped: result.stopped,
  ...(result.pending ? { pending: result.pending } : {}),
})

/** The session a chat request continues (raw body: this runs before validation). */
const namedSession = (request: FastifyRequest) => {
  const body = request.body as { session_id?: unknown } | null | undefined
  return typeof body?.session_id === 'string' ? body.session_id : undefined
}

const chat: FastifyPluginAsyncTypebox = async (app) => {
  app.post(
    '/v1/chat',
    {
      config: { sessionRateLimit: true, idempotent: true, sessionOwner: namedSession },
      schema: {
        operationId: 'runChat',
        tags: ['chat'],
        summary: 'Run one agent turn (JSON, or SSE with stream: true)',
        description:
          'Without session_id a new session is created. The stream sends `event: message` LMC chunks, `event: error` on failure and finally `event: done` with the session id and usage.',
        body: ChatBody,
        response: { 200: jsonOrEventStream('The turn: its final answer and every message it added', ChatResponse, ChatStreamEvent), ...protectedErrors(400, 404, 409, 422, 502, 503, 504) },
      },
    },
    async (request, reply) => {
      const { tenantId } = principal(request)
      const body = request.body
      const session = await app.chat.session(tenantId, body.session_id, () => app.sessions.create(tenantId, { model: body.config?.llm?.model }))
      reply.header('x-session-id', session.id)
      const base = { tenantId, sessionId: session.id, newSession: !body.session_id, inputs: body.messages, config: body.config }

      if (!body.stream) {
        return turnAnswer(session.id, await app.chat.run({ ...base, signal: disconnectSignal(reply) }))
      }

      return streamRun(request, reply, {
        hold: true,
        start: (send, started) => app.chat.run({ ...base, onStart: started, emit: (chunk) => send(chunk, 'message') }),
        stop: () => app.runs.stop(session.id),
        done: (sse, result) => sse.send(doneEvent(session.id, result), 'done'),
        error: (sse, body) => sse.send(body, 'error'),
      })
    },
  )

  app.post(
    '/v1/sessions/:id/stop',
    {
      config: { sessionOwner: 'params' },
      schema: {
        operationId: 'stopRun',
        tags: ['chat'],
        summary: 'Cancel the running turn (upstream request aborted, code interrupted)',
        params: SessionIdParams,
        response: { 200: Ack, ...protectedErrors(404) },
      },
    },
    async (request) => {
      const session = await app.sessions.get(principal(request).tenantId, request.params.id)
      if (app.runs.stop(session.id)) return { ok: true }
      if (await app.chat.cancelSuspended(session.id)) return { ok: true, detail: 'The suspended turn was ended without an answer' }
      return { ok: false, detail: 'No run in progress' }
    },
  )

  app.post(
    '/v1/sessions/:id/confirm',
    {
      // It resumes the agent, so it counts like a chat and honours Idempotency-Key like one.
      config: { sessionOwner: 'params', sessionRateLimit: true, idempotent: true },
      schema: {
        operationId: 'confirmRun',
        tags: ['chat'],
        summary: 'Approve or decline the code a suspended turn waits on (auto_run: false), and continue the turn',
        description:
          'Answers like POST /v1/chat: the resumed turn as JSON, or as an event stream with `stream: true`. 409 `nothing_to_confirm` when no turn of the session waits for a confirmation.',
        params: SessionIdParams,
        body: ConfirmBody,
        response: {
          200: jsonOrEventStream('The resumed turn: its final answer and every message it added', ChatResponse, ChatStreamEvent),
          ...protectedErrors(400, 404, 409, 422, 502, 503, 504),
        },
      },
    },
    async (request, reply) => {
      const { tenantId } = principal(request)
      const session = await app.sessions.get(tenantId, request.params.id)
      app.chat.check(session.id)
      const base = { tenantId, sessionId: session.id, approve: request.body.approve }
      if (!request.body.stream) return turnAnswer(session.id, await app.chat.confirm({ ...base, signal: disconnectSignal(reply) }))
      return streamRun(request, reply, {
        hold: true,
        start: (send, started) => app.chat.confirm({ ...base, onStart: started, emit: (chunk) => send(chunk, 'message') }),
        stop: () => app.runs.stop(session.id),
        done: (sse, result) => sse.send(doneEvent(session.id, result), 'done'),
        error: (sse, body) => sse.send(body, 'error'),
      })
    },
  )
}

export default chat
