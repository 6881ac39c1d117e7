import { spawnSync } from 'node:child_process'
import t from 'tap'
import { ConfigError, loadConfig } from '../config.js'

t.test('defaults match the specification', async (t) => {
  const c = loadConfig({})
  t.equal(c.LITELLM_MODEL, 'gpt-4o-mini')
  t.equal(c.PORT, 5001)
  t.equal(c.HOST, '127.0.0.1')
  t.equal(c.MAX_TOKENS, 4096)
  t.equal(c.TEMPERATURE, 0.7)
  t.equal(c.RATE_LIMIT_PER_MINUTE, 60)
  t.equal(c.SESSION_RATE_LIMIT_PER_MINUTE, 10)
  t.equal(c.SANDBOX, 'bwrap')
  t.equal(c.DATA_DIR, './data')
  t.same(c.adminKeys, [])
  t.equal(c.MAX_CONNECTIONS_PER_IP, 256)
  t.equal(c.HEADERS_TIMEOUT_MS, 10_000)
  t.equal(c.REQUEST_TIMEOUT_MS, 120_000)
  t.equal(c.KEEP_ALIVE_TIMEOUT_MS, 10_000)
  t.equal(c.WS_PING_INTERVAL_MS, 30_000)
})

t.test('aliases and comma-separated admin keys', async (t) => {
  const c = loadConfig({ OPENAI_BASE_URL: 'http://x/v1', OPENAI_API_KEY: 'sk-1', API_KEY: 'a, b,,c' })
  t.equal(c.LLM_BASE_URL, 'http://x/v1')
  t.equal(c.LLM_API_KEY, 'sk-1')
  t.same(c.adminKeys, ['a', 'b', 'c'])
  t.equal(loadConfig({ LLM_BASE_URL: 'http://a/v1', OPENAI_BASE_URL: 'http://b/v1' }).LLM_BASE_URL, 'http://a/v1')
})

t.test('bad values name the variable and what is allowed', async (t) => {
  const cases: [Record<string, string>, RegExp][] = [
    [{ PORT: 'abc' }, /^Invalid configuration: PORT must be integer \(got "abc"\)$/],
    [{ PORT: '70000' }, /PORT must be <= 65535/],
    [{ RATE_LIMIT_PER_MINUTE: '-1' }, /RATE_LIMIT_PER_MINUTE must be >= 0/],
    [{ LOG_LEVEL: 'loud' }, /LOG_LEVEL must be one of fatal, error, warn, info, debug, trace, silent \(got "loud"\)/],
    [{ SANDBOX: 'docker' }, /SANDBOX must be one of bwrap, none/],
    [{ DATABASE_URL: 'mysql://x' }, /^Invalid configuration: DATABASE_URL must be a postgres:\/\/ or postgresql:\/\/ URL such as postgres:\/\/user:password@localhost:5432\/oi \(got "mysql:\/\/x"\)$/],
    [{ DATABASE_URL: 'postgres://' }, /DATABASE_URL must be a postgres:\/\/ or postgresql:\/\/ URL/],
    [{ LLM_BASE_URL: 'localhost:4000/v1' }, /^Invalid configuration: LLM_BASE_URL must be a http:\/\/ or https:\/\/ URL such as http:\/\/localhost:4000\/v1 \(got "localhost:4000\/v1"\)$/],
    [{ LLM_BASE_URL: 'http//localhost:4000' }, /LLM_BASE_URL must be a http:\/\/ or https:\/\/ URL/],
    [{ OPENAI_BASE_URL: 'api.openai.com/v1' }, /OPENAI_BASE_URL must be a http:\/\/ or https:\/\/ URL/],
    [{ REDIS_URL: 'localhost:6379' }, /^Invalid configuration: REDIS_URL must be a redis:\/\/ or rediss:\/\/ URL such as redis:\/\/localhost:6379 \(got "localhost:6379"\)$/],
    [{ REDIS_URL: 'http://user:hunter2@h' }, /REDIS_URL must be .* \(got "http:\/\/…"\)$/],
    [{ TEMPERATURE: '3' }, /TEMPERATURE must be <= 2/],
    [{ TLS_CERT_FILE: '/x.pem' }, /TLS_CERT_FILE and TLS_KEY_FILE must be set together/],
    [{ HEADERS_TIMEOUT_MS: '50' }, /HEADERS_TIMEOUT_MS must be >= 100/],
    [{ HEADERS_TIMEOUT_MS: '5000', REQUEST_TIMEOUT_MS: '1000' }, /HEADERS_TIMEOUT_MS must not exceed REQUEST_TIMEOUT_MS/],
    [{ MAX_CONNECTIONS_PER_IP: '-1' }, /MAX_CONNECTIONS_PER_IP must be >= 0/],
    [{ REPLICA_URL: 'http://10.0.0.5:5001' }, /REPLICA_URL needs REDIS_URL, DATABASE_URL, REPLICA_SECRET, SECRETS_KEY as well/],
    [{ REPLICA_URL: 'http://10.0.0.5:5001', REDIS_URL: 'redis://r', DATABASE_URL: 'postgres://d/oi', REPLICA_SECRET: 'x'.repeat(32) }, /REPLICA_URL needs SECRETS_KEY as well/],
    [{ REPLICA_URL: 'ftp://10.0.0.5' }, /REPLICA_URL must be a http:\/\/ or https:\/\/ URL/],
    [{ REPLICA_SECRET: 'short' }, /REPLICA_SECRET must NOT have fewer than 32 characters/],
    [{ LEASE_TTL_MS: '500' }, /LEASE_TTL_MS must be >= 1000/],
  ]
  for (const [env, re] of cases) t.throws(() => loadConfig(env), re, JSON.stringify(env))
  t.throws(() => loadConfig({ PORT: 'abc' }), ConfigError)
  const urls = loadConfig({ LLM_BASE_URL: 'https://api.openai.com/v1', DATABASE_URL: 'postgresql://u:p@db/oi', REDIS_URL: 'rediss://r:6380/0' })
  t.match(urls, { LLM_BASE_URL: 'https://api.openai.com/v1', DATABASE_URL: 'postgresql://u:p@db/oi', REDIS_URL: 'rediss://r:6380/0' }, 'good URLs pass')
  t.equal(loadConfig({ HEADERS_TIMEOUT_MS: '5000', REQUEST_TIMEOUT_MS: '0' }).REQUEST_TIMEOUT_MS, 0, 'no request timeout, any header timeout')
})

t.test('the process stops with one line and exit code 1 on a bad value', async (t) => {
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'cli.ts'], {
    env: { PATH: process.env.PATH, PORT: 'abc' },
    encoding: 'utf8',
    timeout: 30_000,
  })
  t.equal(r.status, 1)
  t.equal(r.stderr.trim(), 'Invalid configuration: PORT must be integer (got "abc")')
  t.notMatch(r.stderr, /at .*\.ts/, 'no stack trace')
})

t.test('cli --help and --version', async (t) => {
  const help = spawnSync(process.execPath, ['--import', 'tsx', 'cli.ts', '--help'], { encoding: 'utf8', timeout: 30_000 })
  t.equal(help.status, 0)
  t.match(help.stdout, /--host HOST/)
  const version = spawnSync(process.execPath, ['--import', 'tsx', 'cli.ts', '--version'], { encoding: 'utf8', timeout: 30_000 })
  t.match(version.stdout.trim(), /^\d+\.\d+\.\d+$/)
  const bad = spawnSync(process.execPath, ['--import', 'tsx', 'cli.ts', '--port', 'x'], { encoding: 'utf8', timeout: 30_000 })
  t.equal(bad.status, 1)
})
