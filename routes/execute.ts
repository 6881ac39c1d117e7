import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { principal } from '../plugins/auth.js'
import { disconnectSignal, streamRun } from '../plugins/sse.js'
import { Ack } from '../schemas/chat.js'
import { protectedErrors, SessionIdParams } from '../schemas/common.js'
import { ErrorEvent, jsonOrEventStream, LmcChunk, sseEvent } from '../schemas/streams.js'
import { ApiError, invalidRequest } from '../services/errors.js'
import { MessageCollector, OutputWriter } from '../services/output-writer.js'
import { resolveLanguage } from '../services/kernels/manager.js'
import type { ExecResult, Language } from '../services/kernels/types.js'

const ExecuteBody = Type.Object(
  {
    language: Type.String({ minLength: 1, maxLength: 32, description: 'python, shell or javascript (aliases: py, python3, bash, sh, zsh, js, node, nodejs)' }),
    code: Type.String({ maxLength: 1_000_000 }),
    timeout_ms: Type.Optional(Type.Integer({ minimum: 1, description: 'capped at EXEC_TIMEOUT_MS' })),
    stream: Type.Optional(Type.Boolean({ default: false })),
  },
  { additionalProperties: false, examples: [{ language: 'python', code: 'print(1+1)', timeout_ms: 10_000 }] },
)

const ExecutionSummary = {
  exit_code: Type.Union([Type.Integer(), Type.Null()]),
  error: Type.Optional(Type.Object({ name: Type.String(), value: Type.String(), traceback: Type.String() })),
  duration_ms: Type.Number(),
  timed_out: Type.Boolean(),
  state_lost: Type.Boolean(),
  truncated: Type.Boolean(),
}

const ExecuteResponse = Type.Object({ outputs: Type.Array(Type.Ref('LmcMessage')), ...ExecutionSummary })

const ExecuteStreamEvent = Type.Union(
  [
    sseEvent('message', LmcChunk, 'A piece of an output message (console text, an image, an error) as the code produces it'),
    ErrorEvent,
    sseEvent('done', Type.Object(ExecutionSummary), 'The execution ended; the stream ends'),
  ],
  { title: 'Execute stream event', description: 'With `stream: true`: `event: message` pieces, then `event: done` (or `event: error`).' },
)

const Language = Type.Object({
  name: Type.String(),
  aliases: Type.Array(Type.String()),
  version: Type.Union([Type.String(), Type.Null()]),
  available: Type.Boolean(),
  reason: Type.Optional(Type.String({ description: 'Why the language is not available' })),
})

const summary = (r: ExecResult) => ({
  exit_code: r.exitCode,
  ...(r.error ? { error: r.error } : {}),
  duration_ms: r.durationMs,
  timed_out: r.timedOut,
  state_lost: r.stateLost,
  truncated: r.truncated,
})

/** Code straight into the session's kernel, no model involved. */
const execute: FastifyPluginAsyncTypebox = async (app) => {
  const languages = async () => {
    const [found, sandbox] = await Promise.all([app.kernels.languages(), app.sandboxStatus()])
    return found.map((info) => {
      if (!sandbox.ok) return { ...info, available: false, reason: `the sandbox does not work on this host: ${sandbox.reason}` }
      return info.available ? info : { ...info, reason: 'its interpreter was not found on this host' }
    })
  }

  const usable = async (name: string): Promise<Language> => {
    const sandbox = await app.sandboxStatus()
    if (!sandbox.ok) throw new ApiError(503, 'unavailable_error', 'kernel_unavailable', `No code can run: the sandbox does not work on this host (${sandbox.reason})`)
    const language = resolveLanguage(name)
    const info = (await app.kernels.languages()).find((l) => l.name === language)
    if (!language || !info?.available) throw invalidRequest(`Language '${name}' is not available on this server (see GET /v1/languages)`, 'language')
    return language
  }

  app.get(
    '/v1/languages',
    {
      schema: {
        operationId: 'listLanguages',
        tags: ['execute'],
        summary: 'Languages this host can run, with versions',
        response: { 200: Type.Object({ languages: Type.Array(Language) }, { description: 'The languages' }), ...protectedErrors() },
      },
    },
    async () => ({ languages: await languages() }),
  )

  app.post(
    '/v1/sessions/:id/execute',
    {
      config: { sessionOwner: 'params', sessionRateLimit: true },
      schema: {
        operationId: 'executeCode',
        tags: ['execute'],
        summary: 'Run code in the session kernel (JSON, or SSE of LMC chunks with stream: true)',
        params: SessionIdParams,
        body: ExecuteBody,
        response: { 200: jsonOrEventStream('The outputs and how the code ended', ExecuteResponse, ExecuteStreamEvent), ...protectedErrors(400, 404) },
      },
    },
    async (request, reply) => {
      const { tenantId } = principal(request)
      const session = await app.sessions.get(tenantId, request.params.id)
      const language = await usable(request.body.language)
      const base = { tenantId, sessionId: session.id, language, code: request.body.code, timeoutMs: request.body.timeout_ms }

      if (!request.body.stream) {
        const messages = new MessageCollector()
        const writer = new OutputWriter(messages)
        const result = await app.execution.run({ ...base, signal: disconnectSignal(reply), onOutput: (o) => writer.push(o) })
        await writer.finish(result)
        return { outputs: messages.messages, ...summary(result) }
      }

      const controller = new AbortController()
      return streamRun(request, reply, {
        start: (send) => {
          const writer = new OutputWriter(new MessageCollector((chunk) => send(chunk, 'message')))
          return app.execution
            .run({ ...base, signal: controller.signal, onOutput: (o) => writer.push(o) })
            .then(async (result) => {
              await writer.finish(result)
              return result
            })
        },
        stop: () => controller.abort(),
        done: (sse, result) => sse.send(summary(result), 'done'),
        error: (sse, body) => sse.send(body, 'error'),
      })
    },
  )

  app.post(
    '/v1/sessions/:id/interrupt',
    {
      config: { sessionOwner: 'params' },
      // Like /stop, outside the per-session limit: a session that used up its executions must
      // still be able to stop the one that hangs instead of waiting for EXEC_TIMEOUT_MS.
      schema: {
        operationId: 'interruptExecution',
        tags: ['execute'],
        summary: 'Interrupt the running execution',
        params: SessionIdParams,
        response: { 200: Ack, ...protectedErrors(404) },
      },
    },
    async (request) => {
      const session = await app.sessions.get(principal(request).tenantId, request.params.id)
      const interrupted = await app.kernels.interrupt(session.id)
      return interrupted ? { ok: true } : { ok: false, detail: 'Nothing was running' }
    },
  )

  app.post(
    '/v1/sessions/:id/restart',
    {
      config: { sessionOwner: 'params', sessionRateLimit: true },
      schema: {
        operationId: 'restartKernels',
        tags: ['execute'],
        summary: "Restart the session's kernels (variables are lost; files stay)",
        params: SessionIdParams,
        body: Type.Optional(
          Type.Object(
            { language: Type.Optional(Type.String({ maxLength: 32, description: 'Only this language (all when left out)' })) },
            { additionalProperties: false, examples: [{ language: 'python' }] },
          ),
        ),
        response: { 200: Ack, ...protectedErrors(400, 404) },
      },
      preValidation: async (request) => {
        request.body ??= {}
      },
    },
    async (request) => {
      const session = await app.sessions.get(principal(request).tenantId, request.params.id)
      const name = request.body?.language
      await app.kernels.restart(session.id, name ? await usable(name) : undefined)
      return { ok: true }
    },
  )
}

export default execute
