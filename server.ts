import { resolve } from 'node:path'
import closeWithGrace from 'close-with-grace'
import { buildApp } from './app.js'
import { type Config, ConfigError, loadConfig } from './config.js'
import { loadAdminKey } from './services/crypto.js'
import type { SandboxStatus } from './plugins/kernels.js'
import { createLogger, flushLogs } from './services/logger.js'
import { VERSION } from './services/version.js'

function banner(config: Config, url: string, sandbox: SandboxStatus, compatPort: number | undefined): string {
  const storage = config.DATABASE_URL ? 'PostgreSQL (DATABASE_URL)' : `SQLite in ${config.DATA_DIR}`
  const lines = [
    `oi-server ${VERSION} listening on ${url}`,
    `  docs:      ${url}/docs`,
    `  storage:   ${storage}`,
    `  sandbox:   ${config.SANDBOX}${config.SANDBOX === 'none' ? '  (WARNING: code runs without isolation)' : ''}${sandbox.ok ? '' : `  (NOT WORKING, no code can run: ${sandbox.reason})`}`,
    `  model:     ${config.LITELLM_MODEL}${config.LLM_BASE_URL ? ` via ${config.LLM_BASE_URL}` : '  (no LLM_BASE_URL: set it to enable /v1/chat)'}`,
    `  rate limit: ${config.REDIS_URL ? 'Redis' : 'in memory'}`,
    ...(config.REPLICA_URL ? [`  replica:   reached at ${config.REPLICA_URL}; session leases in Redis, ${config.LEASE_TTL_MS} ms`] : []),
    `  Open Interpreter protocol: ${url}/oi${compatPort === undefined ? '' : ` and the root of port ${compatPort} (OI_COMPAT_PORT)`}`,
  ]
  const generated = config.generatedApiKey
  if (generated) {
    lines.push(
      ...(generated.created
        ? [`  API key:   ${generated.key}  (generated because API_KEY is unset; shown only now)`, `             kept in ${generated.file} (mode 0600) and reused at every start;`]
        : [`  API key:   the one kept in ${generated.file} (mode 0600; generated at the first start because API_KEY is unset);`]),
      '             to rotate it, delete that file and restart, or set API_KEY',
    )
  }
  return `${lines.join('\n')}\n`
}

/** Process entry: config, logger, graceful shutdown, listen. */
export async function start(overrides: { host?: string; port?: number } = {}): Promise<void> {
  let config: Config
  try {
    config = loadConfig(process.env, true)
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`)
      process.exit(1)
    }
    throw err
  }
  if (overrides.host) config.HOST = overrides.host
  if (overrides.port !== undefined) config.PORT = overrides.port
  if (config.adminKeys.length === 0) {
    const file = resolve(config.DATA_DIR, 'admin.key')
    const { key, created } = loadAdminKey(file)
    config.generatedApiKey = { key, file, created }
    config.adminKeys = [key]
  }

  // secret values that reach a log line (an upstream error quoting a prompt, say) are masked
  let redact = (line: string) => line
  const logger = createLogger({ level: config.LOG_LEVEL, logDir: config.LOG_DIR, pretty: Boolean(process.stdout.isTTY) }, (line) => redact(line))
  const app = await buildApp(config, { logger })
  redact = app.secrets.redactAll

  closeWithGrace({ delay: config.SHUTDOWN_GRACE_MS, logger }, async ({ err, signal }) => {
    if (err) logger.error({ err }, 'shutting down after an error')
    else logger.info({ signal }, 'shutting down')
    // A replica hands its sessions over first, while it still answers (forwarding what it no
    // longer owns), so a load balancer's requests never meet a closed port mid-session.
    if (app.cluster && signal) {
      const drained = await app.cluster.drain(config.SHUTDOWN_GRACE_MS)
      logger.info({ sessions: drained.handedOver, ms: drained.ms }, 'sessions handed over')
    }
    await app.close()
    // the destinations buffer lines: the last ones, the shutdown's included, are written now
    await flushLogs(logger)
  })

  const address = await app.listen({ host: config.HOST, port: config.PORT })
  const compatPort = config.OI_COMPAT_PORT === undefined ? undefined : await app.listenOiCompat({ host: config.HOST, port: config.OI_COMPAT_PORT })
  // the probe logs its one line (with the fix) when the sandbox cannot work
  const sandbox = await app.sandboxStatus()
  // stderr: stdout carries only the JSON log lines, so a pipe into a log collector stays parsable
  process.stderr.write(banner(config, address.replace('[::1]', 'localhost'), sandbox, compatPort))
}
