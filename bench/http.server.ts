/**
 * The two servers of http.bench.ts, each started in its own process by spawnServer():
 *   full  the real app as server.ts builds it: bearer auth, per-IP rate limit, request logging at
 *         info to LOG_DIR through the secrets mask, a fixed MODELS list, embedded SQLite
 *   bare  plain Fastify with one route answering BENCH_PATH with BENCH_BODY
 */
import Fastify from 'fastify'
import { buildApp } from '../app.js'
import { loadConfig } from '../config.js'
import { createLogger } from '../services/logger.js'
import { serve } from './lib.js'

const env = (name: string): string => {
  const value = process.env[name]
  if (value === undefined) throw new Error(`${name} is not set`)
  return value
}

if (process.argv[2] === 'full') {
  // Explicit settings, not the caller's environment: the figures must not depend on a stray
  // DATABASE_URL or REDIS_URL (embedded SQLite, in-memory rate limits).
  const config = loadConfig({
    API_KEY: env('BENCH_API_KEY'),
    DATA_DIR: env('BENCH_DATA_DIR'),
    LOG_DIR: env('BENCH_LOG_DIR'),
    LOG_LEVEL: 'info',
    // /v1/models answers from this list, without a database query or an upstream call
    MODELS: 'bench-model',
    // high enough never to answer 429, so every request still goes through the limiter's counting
    RATE_LIMIT_PER_MINUTE: '1000000000',
    SESSION_RATE_LIMIT_PER_MINUTE: '1000000000',
  })
  let redact = (line: string) => line
  const logger = createLogger({ level: config.LOG_LEVEL, logDir: config.LOG_DIR, pretty: false }, (line) => redact(line))
  const app = await buildApp(config, { logger })
  redact = app.secrets.redactAll
  await serve(app)
} else if (process.argv[2] === 'bare') {
  const app = Fastify()
  const body = JSON.parse(env('BENCH_BODY')) as unknown
  app.get(env('BENCH_PATH'), async () => body)
  await serve(app)
} else {
  throw new Error(`usage: http.server.ts full|bare (got ${process.argv[2]})`)
}
