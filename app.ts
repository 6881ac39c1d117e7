import { readFileSync } from 'node:fs'
import type { ServerOptions } from 'node:http'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyServerOptions } from 'fastify'
import type { Config } from './config.js'
import agentPlugin from './plugins/agent.js'
import clusterPlugin from './plugins/cluster.js'
import authPlugin, { protect } from './plugins/auth.js'
import connectionsPlugin from './plugins/connections.js'
import corsPlugin from './plugins/cors.js'
import errorsPlugin, { clientErrorHandler } from './plugins/errors.js'
import httpPlugin, { RequestLog, requestId } from './plugins/http.js'
import idempotencyPlugin from './plugins/idempotency.js'
import jsonPlugin from './plugins/json.js'
import kernelsPlugin, { type SandboxProbe } from './plugins/kernels.js'
import llmPlugin from './plugins/llm.js'
import metricsPlugin from './plugins/metrics.js'
import oiCompatPlugin, { CompatPorts, OI_COMPAT_PREFIX } from './plugins/oi-compat.js'
import rateLimitPlugin from './plugins/rate-limit.js'
import readinessPlugin from './plugins/readiness.js'
import redisPlugin from './plugins/redis.js'
import sessionsPlugin from './plugins/sessions.js'
import storePlugin from './plugins/store.js'
import swaggerPlugin from './plugins/swagger.js'
import websocketPlugin from './plugins/websocket.js'
import chatRoutes from './routes/chat.js'
import { eventLog, eventSocket } from './routes/events.js'
import executeRoutes from './routes/execute.js'
import fileRoutes from './routes/files.js'
import healthRoutes from './routes/health.js'
import keyRoutes from './routes/keys.js'
import mcpRoutes from './routes/mcp.js'
import metricsRoutes from './routes/metrics.js'
import oiCompatRoutes from './routes/oi-compat.js'
import openaiRoutes from './routes/openai.js'
import responseRoutes from './routes/responses.js'
import sessionRoutes from './routes/sessions.js'
import settingsRoutes from './routes/settings.js'
import transferRoutes from './routes/transfer.js'
import { ErrorResponse } from './schemas/common.js'
import { LmcMessage } from './schemas/lmc.js'
import { ReplicaAuth } from './services/cluster/replica-auth.js'
import type { Store } from './services/store/types.js'
import { VERSION } from './services/version.js'

export interface AppOptions {
  /** A logger instance (server.ts builds one from the config); tests pass none to stay quiet. */
  logger?: FastifyBaseLogger
  /** Injected store (tests), otherwise made from the config. */
  store?: Store
  /** Injected sandbox probe (tests), otherwise a throwaway sandbox started as a kernel's would be. */
  sandboxProbe?: SandboxProbe
}

/** The least that is read and thrown away of a body answered before it was read (see plugins/connections.ts). */
const DRAIN_FLOOR_BYTES = 64 * 1024 * 1024

/**
 * The whole application: infrastructure plugins first (order matters: the rate limiter must
 * see every route registered after it, Swagger must see every documented route), then the public
 * routes, then the protected scope. Never listens: server.ts does, tests use inject().
 */
export async function buildApp(config: Config, opts: AppOptions = {}): Promise<FastifyInstance> {
  const tls = config.TLS_CERT_FILE && config.TLS_KEY_FILE
  // Half-sent requests are cut before they reach any hook: headers, then the whole request, must
  // arrive in time. Neither limits a response, so SSE streams and upgraded sockets are unaffected.
  const timeouts: ServerOptions = {
    headersTimeout: config.HEADERS_TIMEOUT_MS,
    requestTimeout: config.REQUEST_TIMEOUT_MS,
    // Node checks both on this interval (30 s by default, which would stretch a 10 s limit to 40 s)
    connectionsCheckingInterval: Math.min(1000, config.HEADERS_TIMEOUT_MS),
  }
  const options: FastifyServerOptions & { http?: ServerOptions; https?: ServerOptions & { cert: Buffer; key: Buffer; handshakeTimeout: number } } = {
    ...(opts.logger ? { loggerInstance: opts.logger } : { logger: false }),
    logController: new RequestLog(),
    ...(tls
      ? {
          https: {
            cert: readFileSync(config.TLS_CERT_FILE!),
            key: readFileSync(config.TLS_KEY_FILE!),
            handshakeTimeout: config.HEADERS_TIMEOUT_MS,
            ...timeouts,
          },
        }
      : { http: timeouts }),
    requestTimeout: config.REQUEST_TIMEOUT_MS,
    keepAliveTimeout: config.KEEP_ALIVE_TIMEOUT_MS,
    // A replica that closes has handed its sessions over: a request that still reaches it is
    // forwarded to the new owner rather than refused.
    return503OnClosing: !config.REPLICA_URL,
    clientErrorHandler,
    // a number is a hop count, which Fastify accepts although its types do not say so
    trustProxy: config.TRUST_PROXY as boolean | string,
    bodyLimit: config.BODY_LIMIT,
    // longer path parameters than the router's default 100 reach validation and get the envelope, not a bare 414
    routerOptions: { maxParamLength: 2048 },
    requestIdHeader: false,
    genReqId: (req) => requestId(req.headers['x-request-id']),
    ajv: { customOptions: { removeAdditional: true, coerceTypes: 'array', useDefaults: true } },
  }
  // Requests that came in on the Open Interpreter listener are routed under its prefix.
  const compatPorts = new CompatPorts()
  options.rewriteUrl = (req) => compatPorts.rewrite(req)
  // HTTPS and HTTP instances differ only in the server type; routes never touch it.
  const app = Fastify(options).withTypeProvider<TypeBoxTypeProvider>()

  app.addSchema(ErrorResponse)
  app.addSchema(LmcMessage)

  await app.register(readinessPlugin)
  await app.register(httpPlugin, { tls: Boolean(tls) })
  await app.register(metricsPlugin)
  await app.register(connectionsPlugin, {
    maxPerAddress: config.MAX_CONNECTIONS_PER_IP,
    drainBytes: Math.max(4 * config.BODY_LIMIT, DRAIN_FLOOR_BYTES),
  })
  await app.register(jsonPlugin)
  await app.register(corsPlugin, { origins: config.CORS_ORIGINS })
  await app.register(swaggerPlugin, { version: VERSION })
  await app.register(redisPlugin, { url: config.REDIS_URL })
  if (app.redis) {
    const redis = app.redis
    app.readiness.set('redis', () => redis.ping())
  }
  await app.register(storePlugin, { databaseUrl: config.DATABASE_URL, dataDir: config.DATA_DIR, store: opts.store })
  await app.register(authPlugin, { adminKeys: config.adminKeys })
  const replicated = config.REPLICA_URL && config.REPLICA_SECRET ? { url: config.REPLICA_URL, secret: config.REPLICA_SECRET } : undefined
  const replicaAuth = replicated && new ReplicaAuth(replicated.secret)
  await app.register(rateLimitPlugin, {
    perMinute: config.RATE_LIMIT_PER_MINUTE,
    sessionPerMinute: config.SESSION_RATE_LIMIT_PER_MINUTE,
    // the replica that forwarded a request counted it
    exempt: replicaAuth && ((request) => replicaAuth.verify(request.headers) !== undefined),
  })
  await app.register(errorsPlugin)
  await app.register(idempotencyPlugin)
  await app.register(sessionsPlugin, { defaultModel: config.LITELLM_MODEL, ttlHours: config.SESSION_TTL_HOURS })
  await app.register(llmPlugin, {
    baseURL: config.LLM_BASE_URL,
    apiKey: config.LLM_API_KEY,
    timeoutMs: config.LLM_TIMEOUT_MS,
    models: config.MODELS,
    defaultModel: config.LITELLM_MODEL,
  })
  await app.register(kernelsPlugin, { config, probe: opts.sandboxProbe })
  await app.register(clusterPlugin, {
    replicas: replicated && {
      ...replicated,
      leaseTtlMs: config.LEASE_TTL_MS,
      idleMs: Math.max(config.KERNEL_IDLE_SECONDS * 1000 || 600_000, config.LEASE_TTL_MS),
    },
  })
  await app.register(agentPlugin, { config })
  await app.register(websocketPlugin, { maxPayload: 1024 * 1024, pingIntervalMs: config.WS_PING_INTERVAL_MS })
  await app.register(oiCompatPlugin, { ports: compatPorts })

  await app.register(healthRoutes, { model: config.LITELLM_MODEL })
  await app.register(async (api) => {
    await api.register(protect)
    await api.register(metricsRoutes)
    await api.register(sessionRoutes)
    await api.register(chatRoutes)
    await api.register(openaiRoutes)
    await api.register(responseRoutes)
    await api.register(executeRoutes)
    await api.register(fileRoutes, { maxFileBytes: config.FILE_MAX_BYTES })
    await api.register(eventLog)
    await api.register(keyRoutes)
    await api.register(settingsRoutes)
    await api.register(transferRoutes, { maxFileBytes: config.FILE_MAX_BYTES })
    await api.register(mcpRoutes, { maxFileBytes: config.FILE_MAX_BYTES })
  })
  await app.register(eventSocket)
  // Its own key handling (X-API-KEY or bearer; the socket's first frame), as Open Interpreter's server.
  await app.register(oiCompatRoutes, { prefix: OI_COMPAT_PREFIX, ack: config.OI_COMPAT_ACK })

  return app
}
