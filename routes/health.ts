import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { VERSION } from '../services/version.js'

const Health = Type.Object(
  {
    status: Type.Union([Type.Literal('healthy'), Type.Literal('degraded')], {
      description: 'degraded: the server answers, but part of it cannot work (see problems)',
    }),
    version: Type.String(),
    model: Type.String(),
    uptime_s: Type.Number(),
    problems: Type.Optional(
      Type.Array(Type.Object({ component: Type.String(), message: Type.String(), fix: Type.String() }), {
        description: 'What does not work on this host and how to fix it',
      }),
    ),
  },
  { description: 'Alive (healthy or degraded)' },
)
const Ready = Type.Object({
  status: Type.Union([Type.Literal('ready'), Type.Literal('not_ready')]),
  checks: Type.Record(
    Type.String(),
    Type.Object({
      ok: Type.Boolean(),
      error: Type.Optional(Type.String()),
      details: Type.Optional(Type.Record(Type.String(), Type.Unknown(), { description: 'What the check found, e.g. which kernel limits this host enforces' })),
    }),
  ),
})

const CHECK_TIMEOUT_MS = 3000

/** Public and not rate limited: load balancers and orchestrators poll these. */
const health: FastifyPluginAsyncTypebox<{ model: string }> = async (app, opts) => {
  const started = Date.now()
  app.get(
    '/v1/health',
    {
      config: { rateLimit: false },
      schema: { operationId: 'getHealth', tags: ['health'], summary: 'Liveness, and what cannot work on this host', security: [], response: { 200: Health } },
    },
    // Still 200 when degraded: the process is alive and should not be restarted for it.
    async () => {
      const sandbox = await app.sandboxStatus()
      const base = { version: VERSION, model: opts.model, uptime_s: Math.round((Date.now() - started) / 1000) }
      if (sandbox.ok) return { status: 'healthy' as const, ...base }
      const problem = { component: 'sandbox', message: `no code can run: ${sandbox.reason}`, fix: sandbox.fix ?? '' }
      return { status: 'degraded' as const, ...base, problems: [problem] }
    },
  )

  app.get(
    '/v1/health/ready',
    {
      config: { rateLimit: false },
      schema: {
        operationId: 'getReadiness',
        tags: ['health'],
        summary: 'Readiness: store, sandbox and Redis usable',
        security: [],
        response: { 200: { ...Ready, description: 'Ready' }, 503: { ...Ready, description: 'A check failed' } },
      },
    },
    async (_request, reply) => {
      const entries = await Promise.all(
        [...app.readiness].map(async ([name, check]) => {
          let timer: NodeJS.Timeout | undefined
          try {
            const details = await Promise.race([
              check(),
              new Promise((_, reject) => {
                timer = setTimeout(() => reject(new Error('timed out')), CHECK_TIMEOUT_MS)
              }),
            ])
            return [name, typeof details === 'object' && details !== null ? { ok: true, details: details as Record<string, unknown> } : { ok: true }] as const
          } catch (err) {
            return [name, { ok: false, error: (err as Error).message }] as const
          } finally {
            clearTimeout(timer)
          }
        }),
      )
      const ok = entries.every(([, r]) => r.ok)
      return reply.code(ok ? 200 : 503).send({ status: ok ? 'ready' : 'not_ready', checks: Object.fromEntries(entries) })
    },
  )
}

export default health
