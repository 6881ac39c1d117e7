import { randomUUID } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import { Readable } from 'node:stream'
import replyFrom from '@fastify/reply-from'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { Agent } from 'undici'
import { RedisEventRelay } from '../services/cluster/event-relay.js'
import { LeaseTable, type Placement } from '../services/cluster/leases.js'
import { type Forwarder, ReplicaAuth } from '../services/cluster/replica-auth.js'
import { ApiError, sessionMoved } from '../services/errors.js'
import type { KernelRunner } from '../services/execution.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /**
     * With replicas, the session this route acts on is served by the replica that owns it:
     * 'params' names it by the `:id` path parameter (forwarded before the body is read, so uploads
     * stream through untouched); a function names it from the parsed body (forwarded before
     * validation). Either way before the rate limits and Idempotency-Key of the route.
     */
    sessionOwner?: 'params' | ((request: FastifyRequest) => Promise<string | undefined> | string | undefined)
  }
  interface FastifyInstance {
    /** Set when this process is one of several replicas (REPLICA_URL); null otherwise. */
    cluster: Cluster | null
  }
  interface FastifyRequest {
    /** The replica that forwarded this request, when its proof checked out. */
    forwarder: Forwarder | null
  }
}

export interface ClusterOptions {
  url: string
  secret: string
  leaseTtlMs: number
  /** Idle sessions keep their lease this long (KERNEL_IDLE_SECONDS, at least one lease lifetime). */
  idleMs: number
}

/** A request passes at most this many replicas (a stale owner cache forwards once more). */
const MAX_HOPS = 3
/** Ties a forwarded request to its client's signal inside this process; never sent on. */
const FORWARD_HEADER = 'x-oi-forward-key'
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i
const STATE_LOST_WHY = 'The server process that ran this session\'s kernels stopped, and another one took the session over'
// A forward that failed before reaching the owner is safe to answer with "retry".
const CONNECT_ERRORS = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'UND_ERR_CONNECT_TIMEOUT'])

const ownerUnavailable = (retryAfterMs: number) => {
  const seconds = Math.max(1, Math.ceil(retryAfterMs / 1000))
  return new ApiError(
    503,
    'unavailable_error',
    'owner_unavailable',
    `The server process that holds this session does not answer; another one takes the session over within ${seconds} s`,
    null,
    { retry_after: seconds },
  )
}

/** What the rest of the app uses of replication (see the README's "Replicas" section). */
export interface Cluster {
  readonly leases: LeaseTable
  readonly auth: ReplicaAuth
  readonly relay: RedisEventRelay
  /** The fencing generation of the session's writes here, taking a free lease; throws session_moved when another replica owns it. */
  fence(sessionId: string): Promise<number>
  /** Kernels that run only for sessions whose lease this replica holds. */
  runner(kernels: KernelRunner): KernelRunner
  /** True to serve the request here; false when it was forwarded to the session's owner (the reply is under way). */
  serve(request: FastifyRequest, reply: FastifyReply, sessionId: string): Promise<boolean>
  /** The owner's URL when another replica owns the session; undefined when it is served here. */
  ownerOf(sessionId: string): Promise<string | undefined>
  /** Headers that authenticate a call this replica makes to another one. */
  callHeaders(): Record<string, string>
  /** SIGTERM: stop taking sessions, let runs finish, hand every lease over, within `graceMs`. */
  drain(graceMs: number): Promise<{ handedOver: number; ms: number }>
}

/**
 * Replication across processes: owner leases in Redis (services/cluster/leases.ts), forwarding of
 * a session's requests to its owner with @fastify/reply-from (undici; SSE and uploads stream
 * through), authenticated replica-to-replica calls, and event wake-ups over Redis. Registered
 * only with REPLICA_URL; without it `app.cluster` is null and nothing here runs.
 */
export default fp(
  async function cluster(app: FastifyInstance, { replicas: opts }: { replicas?: ClusterOptions }) {
    app.decorateRequest('forwarder', null)
    if (!opts || !app.redis) {
      app.decorate('cluster', null)
      return
    }
    const redis = app.redis
    const auth = new ReplicaAuth(opts.secret)
    const replicaId = randomUUID()
    const leases = new LeaseTable({
      redis,
      replicaId,
      url: opts.url.replace(/\/+$/, ''),
      ttlMs: opts.leaseTtlMs,
      idleMs: opts.idleMs,
      busy: (id) => app.runs.get(id) !== undefined || app.kernels.hasKernels(id),
      onAcquired: (id, generation) => app.store.fenceSession(id, generation),
      onLost: (id) => {
        app.runs.stop(id)
        const had = app.kernels.hasKernels(id)
        void app.kernels.shutdownSession(id).catch((err) => app.log.error({ err, sessionId: id }, 'kernels of a lost session not stopped'))
        if (had) app.kernels.markStateLost(id, 'This server process lost the session for a while and stopped its kernels')
      },
      onStateLost: (id) => app.kernels.markStateLost(id, STATE_LOST_WHY),
      logger: app.log,
    })
    const relay = new RedisEventRelay(redis, app.log)

    // Runs and streams last as long as they last; the client's own timeouts apply. Few enough
    // connections per owner that a handful of peers stay under its MAX_CONNECTIONS_PER_IP.
    // No keep-alive (pipelining 0): a request is never written to a connection that a draining
    // replica is closing, where it could not tell whether the other side had acted on it; a
    // closed port is refused at connect time, which is safe to try elsewhere.
    const agent = new Agent({ headersTimeout: 0, bodyTimeout: 0, connections: 64, pipelining: 0 })
    // reply-from cannot cancel a request it forwards; this dispatcher gives each one the signal of
    // its client, named by a header only this process sets (and removes), so a client that leaves
    // cuts the forwarded request and the owner stops the run as if the client had left it.
    const signals = new Map<string, AbortSignal>()
    const dispatcher = {
      request(options: Agent.DispatchOptions & Record<string, unknown>, callback: (err: Error | null, data?: unknown) => void) {
        const headers = options.headers as Record<string, string | undefined>
        const key = headers[FORWARD_HEADER]
        headers[FORWARD_HEADER] = undefined
        const signal = key === undefined ? undefined : signals.get(key)
        return agent.request({ ...(options as Parameters<Agent['request']>[0]), ...(signal ? { signal } : {}) }, callback as never)
      },
    }
    await app.register(replyFrom, { undici: dispatcher as never, disableRequestLogging: true })
    app.addHook('onClose', async () => agent.close())

    /**
     * The raw body, handed to one forwarding attempt at a time: each gets a stream that starts
     * reading the request only when the connection is up, so an owner that refused the
     * connection leaves the body whole for the next attempt (undici destroys the stream it got).
     */
    const replayable = (body: Readable) => {
      const state = {
        started: false,
        next: () =>
          Readable.from(
            (async function* () {
              state.started = true
              yield* body
            })(),
            { objectMode: false },
          ),
      }
      return state
    }

    /**
     * Proxies the request to the replica at `placement` and resolves once the answer went out
     * ('sent'), or with 'unreachable' when the connection failed and nothing was sent.
     */
    const forward = (request: FastifyRequest, reply: FastifyReply, sessionId: string, placement: Extract<Placement, { kind: 'remote' }>, hops: number) =>
      new Promise<'sent' | 'unreachable'>((resolve) => {
        const key = randomUUID()
        const controller = new AbortController()
        signals.set(key, controller.signal)
        const done = (outcome: 'sent' | 'unreachable') => {
          signals.delete(key)
          reply.raw.off('close', closed)
          resolve(outcome)
        }
        const closed = () => {
          // the client left before the whole answer: the owner must see it leave too
          if (!reply.raw.writableFinished) controller.abort()
          // Fastify must not go on with this request here, answered or not
          if (!reply.sent) reply.hijack()
          done('sent')
        }
        reply.raw.once('close', closed)
        reply.from(`${placement.url}${request.url}`, {
          rewriteRequestHeaders: (_request, headers) => ({ ...headers, ...auth.headers(replicaId, hops), [FORWARD_HEADER]: key }),
          onError: (failed, { error }) => {
            const code = (error as { cause?: { code?: string } }).cause?.code ?? (error as { code?: string }).code ?? ''
            if (CONNECT_ERRORS.has(code)) {
              request.log.warn({ sessionId, owner: placement.url, code }, 'session owner unreachable')
              return done('unreachable')
            }
            if (controller.signal.aborted) return
            request.log.error({ err: error, sessionId, owner: placement.url }, 'forwarding to the session owner failed')
            // The owner may have acted on it: not to be repeated blindly.
            failed.send(new ApiError(502, 'upstream_error', 'owner_failed', 'The server process that holds this session failed to answer').final())
          },
        })
      })

    /**
     * True to serve the request here. Otherwise it is forwarded to the owner and this resolves
     * (false) once the answer went out, so that Fastify, finding the reply sent, neither parses
     * the body nor runs the handler here. An owner that refuses the connection is looked up
     * again once: a replica that drained and exited has released its leases, and the session is
     * taken here or by whoever took it; an owner whose lease still runs is dead: 503.
     */
    const serve = async (request: FastifyRequest, reply: FastifyReply, sessionId: string, stream?: unknown): Promise<boolean> => {
      if (!UUID.test(sessionId)) return true
      const id = sessionId.toLowerCase()
      const streamed = stream !== undefined && request.method !== 'GET' && request.method !== 'HEAD' ? replayable(stream as Readable) : undefined
      let unreachable: string | undefined
      let refreshed = false
      for (;;) {
        const placement = await leases.place(id)
        if (placement.kind === 'local') {
          const leave = leases.enter(id)
          reply.raw.once('close', leave)
          return true
        }
        // A replica forwarded this here, so what this one has cached may be what that one just
        // gave up (a drained replica hands its free sessions to a peer): Redis says, once.
        if (request.forwarder && !refreshed) {
          refreshed = true
          leases.invalidate(id)
          continue
        }
        const hops = (request.forwarder?.hops ?? 0) + 1
        if (placement.replicaId === unreachable) leases.unreachable(id)
        if (placement.down || placement.replicaId === unreachable || hops > MAX_HOPS) throw ownerUnavailable(placement.retryAfterMs || opts.leaseTtlMs)
        // reply-from pipes a stream body as it arrives and sends a parsed one as JSON.
        if (streamed) request.body = streamed.next()
        if ((await forward(request, reply, id, placement, hops)) === 'sent') return false
        if (unreachable !== undefined || streamed?.started) {
          leases.unreachable(id)
          throw ownerUnavailable(placement.retryAfterMs || opts.leaseTtlMs)
        }
        unreachable = placement.replicaId
        leases.invalidate(id)
      }
    }

    const cluster: Cluster = {
      leases,
      auth,
      relay,
      async fence(sessionId) {
        const placement = await leases.place(sessionId.toLowerCase(), { claim: true })
        if (placement.kind !== 'local') throw sessionMoved()
        return placement.generation
      },
      runner(kernels) {
        return {
          async execute(req) {
            await cluster.fence(req.sessionId)
            await leases.markKernels(req.sessionId.toLowerCase())
            return kernels.execute(req)
          },
        }
      },
      serve,
      async ownerOf(sessionId) {
        if (!UUID.test(sessionId)) return undefined
        const placement = await leases.place(sessionId.toLowerCase())
        if (placement.kind === 'local') return undefined
        if (placement.down) throw ownerUnavailable(placement.retryAfterMs)
        return placement.url
      },
      callHeaders: () => auth.headers(replicaId, 1),
      async drain(graceMs) {
        const started = performance.now()
        const before = leases.heldSessions().length
        // Room is left within the grace period for closing the server after the hand-over.
        const deadline = started + Math.max(0, graceMs * 0.8)
        await leases.drain(
          deadline,
          (id) => app.runs.get(id) !== undefined || leases.active(id),
          async (id) => {
            const had = app.kernels.hasKernels(id)
            await app.kernels.shutdownSession(id)
            return had
          },
        )
        return { handedOver: before, ms: Math.round(performance.now() - started) }
      },
    }
    app.decorate('cluster', cluster)

    // Forwarded requests: the proof is checked once, before the rate limiter counts the request.
    app.addHook('onRequest', async (request) => {
      request.forwarder = auth.verify(request.headers) ?? null
    })
    app.addHook('onRoute', (route) => {
      const owner = route.config?.sessionOwner
      if (!owner) return
      if (owner === 'params') {
        // Before the body is read: the raw request is what reply-from pipes to the owner.
        const hook = async (request: FastifyRequest, reply: FastifyReply, payload: unknown) => {
          const id = (request.params as { id?: string }).id
          if (id !== undefined) await serve(request, reply, id, payload)
          return payload
        }
        route.preParsing = [...[route.preParsing ?? []].flat(), hook as never]
        return
      }
      const hook = async (request: FastifyRequest, reply: FastifyReply) => {
        const id = await owner(request)
        if (id !== undefined) await serve(request, reply, id)
      }
      route.preValidation = [...[route.preValidation ?? []].flat(), hook]
    })

    // A draining replica is alive but should get no new work.
    app.readiness.set('cluster', () => {
      if (leases.draining) throw new Error('draining: handing its sessions over')
      return { replica_id: replicaId, url: opts.url, sessions: leases.heldSessions().length }
    })
    app.sessions.onDelete((id) => leases.forget(id))
    app.addHook('onReady', async () => leases.start())
    app.addHook('preClose', async () => {
      relay.close()
    })
    app.addHook('onClose', async () => leases.stop())
  },
  { name: 'cluster', dependencies: ['redis', 'store', 'sessions', 'kernels', 'readiness'] },
)
