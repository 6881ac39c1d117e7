import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import type {} from '@fastify/websocket'
import type { FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import { streamRun } from '../plugins/sse.js'
import { CLOSE, TOO_SLOW_REASON } from '../plugins/websocket.js'
import { CompletionBody } from '../schemas/chat.js'
import { errors } from '../schemas/common.js'
import type { LmcChunk, LmcInput } from '../schemas/lmc.js'
import { OiSettingsBody, OiStatus } from '../schemas/oi-compat.js'
import { buildCompletion, clientFinishReason, type CompatMessage, CompletionChunks, completionId, fromChatMessages, renderContent } from '../services/agent/openai-compat.js'
import type { ChatResult } from '../services/chat.js'
import type { Principal } from '../services/auth.js'
import { ApiError, invalidRequest } from '../services/errors.js'
import { COMPLETE, type OiChannel, type OiClient, type OiFrame, OiInput } from '../services/oi-compat.js'

/** Past this many unsent bytes a socket is dropped; reconnecting gets what it had not received. */
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024
/** Content one client message may hold, as the native API's LMC inputs. */
const MAX_MESSAGE_CHARS = 1_000_000
const AUTH_TIMEOUT_MS = 30_000
const INPUT_TYPES: Record<string, Set<string | undefined>> = {
  message: new Set([undefined, 'text']),
  file: new Set(['path']),
  image: new Set(['base64.png', 'base64.jpeg']),
}

/** `X-API-KEY` as Open Interpreter clients send it, or `Authorization: Bearer` as everywhere else. */
function keyOf(request: FastifyRequest): string | undefined {
  const header = request.headers['x-api-key']
  if (typeof header === 'string' && header) return header
  return /^Bearer (.+)$/.exec(request.headers.authorization ?? '')?.[1]?.trim()
}

/** The id of an `{"ack": id}` frame, or undefined for any other frame. */
function ackOf(raw: unknown): string | undefined {
  try {
    const parsed: unknown = JSON.parse(String(raw))
    const id = (parsed as { ack?: unknown } | null)?.ack
    return typeof id === 'string' ? id : undefined
  } catch {
    return undefined
  }
}

/** The user's turn from accumulated chunks; only what a user can say (text, a file path, an image). */
function userInputs(messages: ReturnType<OiInput['take']>): LmcInput[] {
  if (messages.length === 0) throw invalidRequest('The message is empty', 'content', 'invalid_message')
  return messages.map((m) => {
    const type = m.type ?? 'message'
    if (m.role !== 'user') throw invalidRequest('Only user messages can be sent', 'role', 'invalid_message')
    if (!INPUT_TYPES[type]?.has(m.format)) throw invalidRequest(`Unsupported message type ${type}${m.format ? ` (${m.format})` : ''}`, 'type', 'invalid_message')
    return { role: 'user', type: type as LmcInput['type'], ...(m.format ? { format: m.format as LmcInput['format'] } : {}), content: m.content }
  })
}

/**
 * Open Interpreter's `--server` protocol (its `interpreter/core/async_core.py`), mounted under a
 * prefix on the main port and served at the root of `OI_COMPAT_PORT`. The WebSocket at `/` and
 * `/heartbeat` need no header (the socket authenticates with a first `{"auth": key}` frame);
 * everything else takes `X-API-KEY` or `Authorization: Bearer`.
 */
const oiCompat: FastifyPluginAsyncTypebox<{ ack: boolean }> = async (app, opts) => {
  const authenticate = async (request: FastifyRequest): Promise<Principal> => {
    const key = keyOf(request)
    if (!key) throw new ApiError(401, 'auth_error', 'missing_api_key', 'Missing API key: send X-API-KEY or Authorization: Bearer <key>')
    const who = await app.keys.resolve(key)
    if (!who) throw new ApiError(401, 'auth_error', 'invalid_api_key', 'Invalid API key')
    request.principal = who
    return who
  }
  const tags = ['open-interpreter']
  const security: Record<string, string[]>[] = [{ bearerAuth: [] }, { oiApiKey: [] }]

  app.get(
    '/heartbeat',
    { schema: { operationId: 'oiHeartbeat', tags, summary: 'Liveness, without a key (Open Interpreter protocol)', security: [], response: { 200: Type.Object({ status: Type.Literal('alive') }, { description: 'Alive' }) } } },
    async () => ({ status: 'alive' as const }),
  )

  app.get(
    '/settings/:name',
    {
      schema: {
        operationId: 'oiGetSetting',
        tags,
        security,
        summary: 'One setting of the default session: messages, auto_run, custom_instructions, system_message or llm',
        params: Type.Object({ name: Type.String({ maxLength: 100 }) }),
        response: { 200: Type.Record(Type.String(), Type.Unknown(), { description: '{name: value}' }), ...errors(401, 404, 429) },
      },
    },
    async (request) => {
      const who = await authenticate(request)
      return app.oiCompat.setting(who.tenantId, request.params.name)
    },
  )

  app.post(
    '/settings',
    {
      schema: {
        operationId: 'oiPostSettings',
        tags,
        security,
        summary: 'Change settings (allowlist); messages: [] resets the conversation',
        description:
          'Allowed: messages (replaces the conversation of the default session), custom_instructions, system_message, llm.model, llm.temperature, llm.max_tokens (these change the tenant settings, as PATCH /v1/settings). auto_run, computer and the upstream URL or key are refused with 403 (advisory GHSA-wpr7-5j9p-qch9); other names with 400. Nothing is applied when anything is refused.',
        body: OiSettingsBody,
        response: { 200: OiStatus, ...errors(400, 401, 403, 409, 429) },
      },
    },
    async (request) => {
      const who = await authenticate(request)
      await app.oiCompat.applySettings(who.tenantId, request.body as Record<string, unknown>)
      return { status: 'success' as const }
    },
  )

  app.post(
    '/openai/chat/completions',
    {
      config: { sessionRateLimit: false },
      schema: {
        operationId: 'oiChatCompletion',
        tags,
        security,
        summary: "The last user message against the default session's history (Open Interpreter's OpenAI-compatible route)",
        description:
          'As Open Interpreter serves it: only the last message is read, and must be from the user; the history is the server\'s. A standard chat.completion, or with stream: true chat.completion.chunk events and data: [DONE]. With auto_run off the answer ends at code waiting for approval ("Do you want to run this code?"); the turn is suspended until a WebSocket `go` or POST /v1/sessions/{id}/confirm.',
        body: CompletionBody,
        response: { ...errors(400, 401, 404, 409, 429, 502, 503, 504) },
      },
    },
    async (request, reply) => {
      const who = await authenticate(request)
      const body = request.body
      const last = body.messages.at(-1) as CompatMessage
      if (last.role !== 'user') throw invalidRequest('The last message must be from the user', `messages[${body.messages.length - 1}].role`, 'invalid_message')
      const { inputs } = fromChatMessages([last])
      const session = await app.oiCompat.session(who.tenantId)
      app.chat.check(session.id)
      const settings = await app.settings.effective(who.tenantId)
      const meta = { id: completionId(), created: Math.floor(Date.now() / 1000), model: body.model ?? settings.model }
      reply.header('x-session-id', session.id)
      const run = (emit?: (chunk: LmcChunk) => void, onStart?: () => void) =>
        app.chat.run({ tenantId: who.tenantId, sessionId: session.id, inputs, settings, ...(onStart ? { onStart } : {}), ...(emit ? { emit } : {}) })
      // As upstream, an answer that stops at code waiting for approval asks for it; `go` resumes the turn.
      const ASK = 'Do you want to run this code?'
      const waits = (result: ChatResult) => result.pending?.type === 'confirmation'

      if (!body.stream) {
        const result = await run()
        const shown = renderContent(result.messages.filter((m) => m.type !== 'confirmation'))
        const content = waits(result) ? `${shown}${shown ? '\n\n' : ''}${ASK}` : shown
        return buildCompletion(meta, content, result.usage, clientFinishReason(result.finishReason))
      }

      const chunks = new CompletionChunks(meta)
      return streamRun(request, reply, {
        hold: true,
        start: (send, started) =>
          run((lmc) => {
            if (lmc.type === 'confirmation') return
            for (const chunk of chunks.push(lmc)) send(chunk)
          }, started),
        stop: () => app.runs.stop(session.id),
        open: (sse) => sse.send(chunks.start()),
        done: (sse, result) => {
          if (waits(result)) {
            for (const chunk of chunks.interrupt()) sse.send(chunk)
            sse.send(chunks.content(`${chunks.text ? '\n\n' : ''}${ASK}`))
          }
          for (const chunk of chunks.finish(clientFinishReason(result.finishReason))) sse.send(chunk)
        },
        error: (sse, err) => {
          for (const chunk of chunks.interrupt()) sse.send(chunk)
          sse.send(err)
        },
        end: (sse) => sse.data('[DONE]'),
      })
    },
  )

  app.get(
    '/',
    {
      websocket: true,
      schema: {
        operationId: 'oiSocket',
        tags,
        summary: 'Open Interpreter WebSocket: {"auth": key} first, then LMC start/content/end chunks',
        description:
          'Answers {"auth": true|false}; frames before a good auth get {"auth": false}. Client chunks build user messages; `end` runs the turn; a new `start` interrupts a running answer; type "command" with content "go" approves the code an answer waits on, "stop" stops it. Output: flagged LMC chunks, then {"role":"server","type":"status","content":"complete"}. With acknowledge=true (or OI_COMPAT_ACK) every frame has an id to return as {"ack": id}. A socket that connects gets what the tenant\'s sockets have not received yet.',
        security: [],
        querystring: Type.Object({ acknowledge: Type.Optional(Type.Boolean({ description: 'Acknowledgement mode for this socket (default: OI_COMPAT_ACK)' })) }),
      },
    },
    (socket: WebSocket, request: FastifyRequest<{ Querystring: { acknowledge?: boolean } }>) => {
      let who: Principal | undefined
      let key = ''
      let channel: OiChannel | undefined
      let detach: (() => void) | undefined
      let unwatch: (() => void) | undefined
      let chain = Promise.resolve()
      const input = new OiInput(MAX_MESSAGE_CHARS)
      const client: OiClient = {
        ack: request.query.acknowledge ?? opts.ack,
        send(frame) {
          if (socket.readyState !== socket.OPEN) return false
          const text = JSON.stringify(frame)
          if (socket.bufferedAmount + Buffer.byteLength(text) > MAX_BUFFERED_BYTES) {
            socket.close(CLOSE.tooSlow, TOO_SLOW_REASON)
            return false
          }
          socket.send(text)
          return true
        },
      }
      const fail = (err: unknown) => {
        const message = err instanceof ApiError ? err.message : 'Internal server error'
        if (!(err instanceof ApiError)) request.log.error({ err }, 'Open Interpreter socket frame failed')
        const frames: OiFrame[] = [{ role: 'server', type: 'error', content: message }, COMPLETE]
        if (channel) channel.notify(client, frames)
        else for (const frame of frames) client.send(frame)
      }
      const join = async (tenantId: string) => {
        const next = await app.oiCompat.channel(tenantId)
        if (next === channel) return next
        detach?.()
        channel = next
        if (socket.readyState === socket.OPEN) detach = next.attach(client)
        return next
      }
      const authenticate = async (candidate: unknown): Promise<boolean> => {
        if (typeof candidate !== 'string' || !candidate) return false
        const watched = await app.keys.watch(candidate, () => socket.close(CLOSE.unauthorized, 'API key revoked or expired'))
        if (!watched) return false
        if (who || socket.readyState !== socket.OPEN) {
          watched.stop()
          return true
        }
        who = watched.principal
        key = candidate
        unwatch = watched.stop
        return true
      }

      const handle = async (raw: unknown, binary: boolean) => {
        let data: Record<string, unknown> | undefined
        try {
          const parsed: unknown = binary ? undefined : JSON.parse(String(raw))
          if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) data = parsed as Record<string, unknown>
        } catch {
          // answered below
        }
        if (data && 'auth' in data) {
          const ok = await authenticate(data.auth)
          client.send({ auth: ok })
          if (ok && who) await join(who.tenantId)
          return
        }
        if (!who) return void client.send({ auth: false })
        // Checked on every frame, as on every request: a key revoked on another replica ends here.
        if (!(await app.keys.resolve(key))) return socket.close(CLOSE.unauthorized, 'API key revoked or expired')
        if (!data) throw invalidRequest('Frames are JSON objects (LMC chunks, commands, {"ack": id})', null, 'invalid_message')
        const current = await join(who.tenantId)
        if ('ack' in data) return current.acknowledge(client, data.ack)
        if (data.start === true) {
          // A new message interrupts the answer in progress; a command (go) acts on it instead.
          if (data.type !== 'command') await current.stop()
          return input.start(data)
        }
        if (data.end === true) {
          const messages = input.take()
          const last = messages.at(-1)
          if (last?.type === 'command') {
            if (last.content === 'stop') return current.stop()
            if (last.content === 'go') return current.approve(who.tenantId, client)
            throw invalidRequest(`Unknown command '${last.content}' (go, stop)`, 'content', 'invalid_message')
          }
          return current.turn(who.tenantId, userInputs(messages), client)
        }
        if ('content' in data) return input.add(data)
        throw invalidRequest('Expected an LMC chunk with start, content or end', null, 'invalid_message')
      }

      const timer = setTimeout(() => {
        if (!who) socket.close(CLOSE.unauthorized, 'authentication timed out')
      }, AUTH_TIMEOUT_MS)
      socket.on('message', (raw, binary) => {
        // Acknowledgements skip the line: one still queued when the socket closes would be lost,
        // and its frame sent again to the next socket.
        if (channel && !binary && client.ack) {
          const ack = ackOf(raw)
          if (ack !== undefined) return channel.acknowledge(client, ack)
        }
        // In order: frames sent right after the auth frame wait for its answer, not for a retry.
        chain = chain.then(() => handle(raw, binary)).catch(fail)
      })
      socket.on('close', () => {
        clearTimeout(timer)
        detach?.()
        unwatch?.()
      })
      const header = keyOf(request)
      if (header)
        chain = chain
          .then(async () => {
            if ((await authenticate(header)) && who) await join(who.tenantId)
          })
          .catch(fail)
    },
  )
}

export default oiCompat
