import { type Static, Type } from '@sinclair/typebox'
import envSchema from 'env-schema'

/**
 * Every setting of the server, read from the environment (and `.env`) and validated once at
 * start-up. A limit of 0 means "off" where documented (RATE_LIMIT_PER_MINUTE,
 * SESSION_RATE_LIMIT_PER_MINUTE, SESSION_TTL_HOURS, KERNEL_IDLE_SECONDS, WORKSPACE_MAX_MB,
 * WORKSPACE_MAX_FILES, MAX_CONNECTIONS_PER_IP, REQUEST_TIMEOUT_MS).
 */
const Int = (def: number, min = 0, max = Number.MAX_SAFE_INTEGER) => Type.Integer({ default: def, minimum: min, maximum: max })
const Str = (description: string) => Type.Optional(Type.String({ minLength: 1, description }))

export const ConfigSchema = Type.Object({
  LITELLM_MODEL: Type.String({ default: 'gpt-4o-mini', minLength: 1 }),
  LLM_BASE_URL: Str('OpenAI-compatible upstream base URL (alias OPENAI_BASE_URL)'),
  OPENAI_BASE_URL: Str('alias of LLM_BASE_URL'),
  LLM_API_KEY: Str('key for the upstream (alias OPENAI_API_KEY)'),
  OPENAI_API_KEY: Str('alias of LLM_API_KEY'),
  LLM_TIMEOUT_MS: Int(600_000, 1000),
  LLM_TOOLS: Type.Boolean({ default: true }),
  MODELS: Str('comma-separated model ids for /v1/models (otherwise asked from the upstream)'),
  MAX_TOKENS: Int(4096, 1),
  TEMPERATURE: Type.Number({ default: 0.7, minimum: 0, maximum: 2 }),
  MAX_ITERATIONS: Int(20, 1, 1000),
  API_KEY: Str('comma-separated admin bearer keys'),
  RATE_LIMIT_PER_MINUTE: Int(60),
  SESSION_RATE_LIMIT_PER_MINUTE: Int(10),
  LOG_LEVEL: Type.Union(
    ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l)),
    { default: 'info' },
  ),
  LOG_DIR: Str('directory for server_out.log and server_err.log'),
  HOST: Type.String({ default: '127.0.0.1', minLength: 1 }),
  PORT: Int(5001, 0, 65535),
  DATA_DIR: Type.String({ default: './data', minLength: 1 }),
  DATABASE_URL: Str('postgres:// or postgresql:// URL'),
  REDIS_URL: Str('redis:// or rediss:// URL'),
  REPLICA_URL: Str('how the other replicas reach this one (http:// or https://); with REDIS_URL and DATABASE_URL turns on replication'),
  REPLICA_SECRET: Type.Optional(Type.String({ minLength: 32, description: 'shared by all replicas: authenticates replica-to-replica calls' })),
  // A dead replica's sessions move after at most this long; renewals run every third of it.
  LEASE_TTL_MS: Int(15_000, 1000, 600_000),
  WORKSPACES_DIR: Str('where session workspaces live (default DATA_DIR/workspaces); shared storage lets files survive a failover'),
  SANDBOX: Type.Union([Type.Literal('bwrap'), Type.Literal('none')], { default: 'bwrap' }),
  SANDBOX_NETWORK: Type.Boolean({ default: false }),
  CORS_ORIGINS: Str('comma-separated allowed origins; unset allows any localhost origin, * allows all'),
  TRUST_PROXY: Type.Union([Type.Boolean(), Type.Integer({ minimum: 0 }), Type.String()], { default: false }),
  BODY_LIMIT: Int(10 * 1024 * 1024, 1024),
  MAX_CONNECTIONS_PER_IP: Int(256),
  HEADERS_TIMEOUT_MS: Int(10_000, 100),
  REQUEST_TIMEOUT_MS: Int(120_000),
  KEEP_ALIVE_TIMEOUT_MS: Int(10_000, 1),
  WS_PING_INTERVAL_MS: Int(30_000, 100),
  TLS_CERT_FILE: Str('PEM certificate; with TLS_KEY_FILE serves HTTPS'),
  TLS_KEY_FILE: Str('PEM private key'),
  SHUTDOWN_GRACE_MS: Int(10_000, 0),
  SESSION_TTL_HOURS: Type.Number({ default: 24, minimum: 0 }),
  PYTHON_BIN: Type.String({ default: '/usr/bin/python3', minLength: 1 }),
  NODE_BIN: Type.String({ default: process.execPath, minLength: 1 }),
  BASH_BIN: Type.String({ default: '/bin/bash', minLength: 1 }),
  KERNEL_IDLE_SECONDS: Int(600),
  MAX_KERNELS: Int(64, 1),
  MAX_KERNELS_PER_TENANT: Int(16, 1),
  EXEC_TIMEOUT_MS: Int(120_000, 100),
  EXEC_GRACE_MS: Int(2000, 0),
  EXEC_OUTPUT_LIMIT_BYTES: Int(1024 * 1024, 1024),
  MODEL_OUTPUT_LIMIT_CHARS: Int(2800, 100),
  KERNEL_MEMORY_MB: Int(1024, 64),
  KERNEL_MAX_PROCESSES: Int(64, 4),
  KERNEL_MAX_FILE_MB: Int(100, 1),
  KERNEL_MAX_OPEN_FILES: Int(256, 16),
  KERNEL_TMPFS_MB: Int(256, 1),
  FILE_MAX_BYTES: Int(100 * 1024 * 1024, 1),
  // At most 2^32 MiB, so the quota in bytes stays an exact integer.
  WORKSPACE_MAX_MB: Int(1024, 0, 2 ** 32),
  WORKSPACE_MAX_FILES: Int(10_000),
  OI_COMPAT_PORT: Type.Optional(Type.Integer({ minimum: 0, maximum: 65535, description: 'second listener speaking the Open Interpreter protocol at its root' })),
  OI_COMPAT_ACK: Type.Boolean({ default: false }),
  SECRETS_KEY: Type.Optional(Type.String({ pattern: '^[0-9a-fA-F]{64}$', description: '32 bytes as hex' })),
})

type Env = Static<typeof ConfigSchema>

export type Config = Omit<Env, 'OPENAI_BASE_URL' | 'OPENAI_API_KEY' | 'API_KEY'> & {
  /** Admin bearer keys; `generatedApiKey` is set when none was configured and the kept one is used. */
  adminKeys: string[]
  generatedApiKey?: GeneratedKey
}

/** The admin key kept in DATA_DIR when API_KEY is unset; `created` when this start made it. */
export interface GeneratedKey {
  key: string
  file: string
  created: boolean
}

export class ConfigError extends Error {
  override name = 'ConfigError'
}

interface AjvError {
  instancePath: string
  message?: string
  params?: { allowedValues?: unknown[]; missingProperty?: string }
}

function describe(err: AjvError, env: Record<string, unknown>): string {
  const name = err.instancePath.replace(/^\//, '').split('/')[0] || err.params?.missingProperty || 'environment'
  const allowed = err.params?.allowedValues ? ` (allowed: ${err.params.allowedValues.join(', ')})` : ''
  const got = name in env ? ` (got ${JSON.stringify(env[name])})` : ''
  return `${name} ${err.message ?? 'is invalid'}${allowed}${got}`
}

/** The allowed values of a variable whose schema is a union of string literals. */
function literals(name: string): string[] | undefined {
  const schema = (ConfigSchema.properties as Record<string, { anyOf?: { const?: unknown }[] }>)[name]
  const values = schema?.anyOf?.map((branch) => branch.const)
  return values?.every((v) => typeof v === 'string') ? (values as string[]) : undefined
}

/** The URL settings: the schemes each accepts and an example for the message. */
const URLS = [
  { names: ['LLM_BASE_URL', 'OPENAI_BASE_URL'], schemes: ['http:', 'https:'], example: 'http://localhost:4000/v1' },
  { names: ['DATABASE_URL'], schemes: ['postgres:', 'postgresql:'], example: 'postgres://user:password@localhost:5432/oi' },
  { names: ['REDIS_URL'], schemes: ['redis:', 'rediss:'], example: 'redis://localhost:6379' },
  { names: ['REPLICA_URL'], schemes: ['http:', 'https:'], example: 'http://10.0.0.5:5001' },
]

/** A URL setting that does not parse, or has another scheme, stops the start (rather than failing at first use). */
function checkUrls(env: Record<string, unknown>): void {
  for (const { names, schemes, example } of URLS) {
    for (const name of names) {
      const value = env[name]
      if (typeof value !== 'string') continue
      let url: URL | undefined
      try {
        url = new URL(value)
      } catch {
        // reported below
      }
      if (!url || !schemes.includes(url.protocol) || !url.hostname) {
        const accepted = schemes.map((s) => `${s}//`).join(' or ')
        // the value may hold a password: show it only when it does not parse as a URL with credentials
        const shown = url?.password ? `${url.protocol}//…` : value
        throw new ConfigError(`Invalid configuration: ${name} must be a ${accepted} URL such as ${example} (got ${JSON.stringify(shown)})`)
      }
    }
  }
}

/**
 * Reads and validates the configuration. Throws ConfigError with one line naming the variable.
 * Pass `env` to validate a given object (tests); `dotenv` reads `.env` from the working directory.
 */
export function loadConfig(env: Record<string, string | undefined> = process.env, dotenv = false): Config {
  const data = Object.fromEntries(Object.entries(env).filter(([, v]) => v !== undefined && v !== ''))
  let parsed: Env
  try {
    parsed = envSchema<Env>({ schema: ConfigSchema, data, dotenv, env: false })
  } catch (err) {
    const first = (err as { errors?: AjvError[] }).errors?.[0]
    if (!first) throw new ConfigError(`Invalid configuration: ${(err as Error).message}`)
    // A union of literals (LOG_LEVEL, SANDBOX): ajv reports each branch; the list reads better.
    const name = first.instancePath.replace(/^\//, '').split('/')[0] ?? ''
    const allowed = literals(name)
    if (allowed) throw new ConfigError(`Invalid configuration: ${name} must be one of ${allowed.join(', ')} (got ${JSON.stringify(data[name])})`)
    throw new ConfigError(`Invalid configuration: ${describe(first, data)}`)
  }
  checkUrls(parsed)
  if (Boolean(parsed.TLS_CERT_FILE) !== Boolean(parsed.TLS_KEY_FILE))
    throw new ConfigError('Invalid configuration: TLS_CERT_FILE and TLS_KEY_FILE must be set together')
  if (parsed.REQUEST_TIMEOUT_MS > 0 && parsed.HEADERS_TIMEOUT_MS > parsed.REQUEST_TIMEOUT_MS)
    throw new ConfigError('Invalid configuration: HEADERS_TIMEOUT_MS must not exceed REQUEST_TIMEOUT_MS')
  if (parsed.OI_COMPAT_PORT !== undefined && parsed.OI_COMPAT_PORT !== 0 && parsed.OI_COMPAT_PORT === parsed.PORT)
    throw new ConfigError('Invalid configuration: OI_COMPAT_PORT must differ from PORT')
  if (parsed.REPLICA_URL) {
    // Replicas share sessions only through Redis (leases, wake-ups) and PostgreSQL (the log), and
    // must read each other's encrypted secrets.
    const missing = ['REDIS_URL', 'DATABASE_URL', 'REPLICA_SECRET', 'SECRETS_KEY'].filter((name) => !parsed[name as keyof Env])
    if (missing.length > 0) throw new ConfigError(`Invalid configuration: REPLICA_URL needs ${missing.join(', ')} as well`)
  }
  const { OPENAI_BASE_URL, OPENAI_API_KEY, API_KEY, ...rest } = parsed
  const adminKeys = (API_KEY ?? '').split(',').map((k) => k.trim()).filter(Boolean)
  return {
    ...rest,
    LLM_BASE_URL: rest.LLM_BASE_URL ?? OPENAI_BASE_URL,
    LLM_API_KEY: rest.LLM_API_KEY ?? OPENAI_API_KEY,
    adminKeys,
  }
}
