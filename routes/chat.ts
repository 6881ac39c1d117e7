import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { principal } from '../plugins/auth.js'
import { disconnectSignal, streamRun } from '../plugins/sse.js'
import { Ack, ChatBody, ChatResponse, ConfirmBody } from '../schemas/chat.js'
import { protectedErrors, SessionIdParams } from '../schemas/common.js'
import { ChatStreamEvent, jsonOrEventStream } from '../schemas/streams.js'
import { ApiError } from '../services/errors.js'

const chat: FastifyPluginAsyncTypebox = async (app) => {
  app.post(
    '/v1/chat',
    {
      config: { sessionRateLimit: true, idempotent: true },
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
        const result = await app.chat.run({ ...base, signal: disconnectSignal(reply) })
        return { message: result.final, messages: result.messages, session_id: session.id, usage: result.usage }
      }

      return streamRun(request, reply, {
        hold: true,
        start: (send, started) => app.chat.run({ ...base, onStart: started, emit: (chunk) => send(chunk, 'message') }),
        stop: () => app.runs.stop(session.id),
        done: (sse, result) => sse.send({ session_id: session.id, usage: result.usage, stopped: result.stopped }, 'done'),
        error: (sse, body) => sse.send(body, 'error'),
      })
    },
  )

  app.post(
    '/v1/sessions/:id/stop',
    {
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
      const stopped = app.runs.stop(session.id)
      return stopped ? { ok: true } : { ok: false, detail: 'No run in progress' }
    },
  )

  app.post(
    '/v1/sessions/:id/confirm',
    {
      schema: {
        operationId: 'confirmRun',
        tags: ['chat'],
        summary: 'Approve or decline the code a run is waiting on (auto_run: false)',
        params: SessionIdParams,
        body: ConfirmBody,
        response: { 200: Ack, ...protectedErrors(400, 404, 409) },
      },
    },
    async (request) => {
      const session = await app.sessions.get(principal(request).tenantId, request.params.id)
      if (!app.runs.get(session.id)?.confirm(request.body.approve))
        throw new ApiError(409, 'conflict_error', 'nothing_to_confirm', 'No run in this session is waiting for a confirmation')
      return { ok: true }
    },
  )
}

export default chat
