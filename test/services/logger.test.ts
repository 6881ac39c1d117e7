import { execFile } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { fileURLToPath } from 'node:url'
import { pino } from 'pino'
import pretty from 'pino-pretty'
import t from 'tap'
import { createLogger, flushLogs, PRETTY, REDACT_PATHS } from '../../services/logger.js'
import { ADMIN_KEY, auth, build, tempDir } from '../helpers/build.js'

t.test('pretty mode: a request is one line', async (t) => {
  let text = ''
  const sink = new Writable({
    write(chunk, _encoding, done) {
      text += chunk
      done()
    },
  })
  const logger = pino(pretty({ ...PRETTY, colorize: false, destination: sink }))
  logger.info(
    { reqId: 'r1', req: { method: 'GET', url: '/v1/sessions', host: 'localhost', remoteAddress: '127.0.0.1' }, res: { statusCode: 200 }, responseTime: 3.14 },
    'request completed',
  )
  logger.info({ code: 'not_found', status: 404 }, 'Session not found')
  const lines = text.trimEnd().split('\n')
  t.equal(lines.length, 2, text)
  t.match(lines[0], /INFO.*GET \/v1\/sessions 200 3\.1ms/)
  t.notMatch(lines[0], /remoteAddress|request completed/)
  t.match(lines[1], /Session not found.*"code":"not_found"/)
})

t.test('expected client and upstream errors are one line without a stack; server faults keep theirs', async (t) => {
  const lines: { level: number; msg: string; err?: unknown; code?: string }[] = []
  const logger = pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line)) })
  const app = await build(t, { SANDBOX: 'none' }, { logger })
  const notConfigured = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [{ role: 'user', type: 'message', content: 'hi' }] } })
  t.equal(notConfigured.statusCode, 503)
  const missing = await app.inject({ url: '/v1/sessions/00000000-0000-4000-8000-000000000000', headers: auth() })
  t.equal(missing.statusCode, 404)

  const logged = (code: string) => lines.find((l) => l.code === code)
  t.match(logged('llm_not_configured'), { level: 40 }, '503 not configured: warn')
  t.match(logged('session_not_found'), { level: 30 }, '404: info')
  for (const code of ['llm_not_configured', 'session_not_found']) t.notOk(logged(code)?.err, `${code}: no error object, no stack`)
  t.notOk(lines.some((l) => l.level >= 50), 'nothing at error level')
})

t.test('buffered log files: lines written just before the flush or the exit are all in the file', async (t) => {
  const dir = tempDir(t)
  const logger = createLogger({ level: 'info', logDir: dir, pretty: false })
  // fewer bytes than the buffer holds for the last ones, so they wait in memory until the flush
  for (let i = 0; i < 1000; i++) logger.info({ i }, 'line')
  logger.warn({ i: 1000 }, 'last line')
  await flushLogs(logger)
  const out = readFileSync(join(dir, 'server_out.log'), 'utf8').trimEnd().split('\n').map((l) => JSON.parse(l) as { i: number; msg: string })
  t.same(out.map((l) => l.i), Array.from({ length: 1001 }, (_, i) => i), 'every line, in order')
  t.match(readFileSync(join(dir, 'server_err.log'), 'utf8'), /"i":1000.*"last line"/, 'warnings reach server_err.log too')

  // a process that exits right after logging: pino flushes the buffers on the way out
  const script = join(dir, 'exit.mts')
  const exitDir = join(dir, 'exit')
  writeFileSync(
    script,
    `import { createLogger } from ${JSON.stringify(fileURLToPath(new URL('../../services/logger.ts', import.meta.url)))}
const logger = createLogger({ level: 'info', logDir: ${JSON.stringify(exitDir)}, pretty: false })
for (let i = 0; i < 10; i++) logger.info({ i }, 'before exit')
process.exit(0)
`,
  )
  await new Promise<void>((resolve, reject) =>
    execFile(process.execPath, ['--import', 'tsx', script], { timeout: 60_000 }, (err, _stdout, stderr) => (err ? reject(new Error(`${err.message}: ${stderr}`)) : resolve())),
  )
  const lines = readFileSync(join(exitDir, 'server_out.log'), 'utf8').trimEnd().split('\n')
  t.equal(lines.length, 10, 'the lines logged just before process.exit are in the file')
})

t.test('request lines carry no credentials; explicit paths redact an error or a field that would', async (t) => {
  const lines: string[] = []
  const logger = pino({ level: 'info', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, { write: (line: string) => lines.push(line) })
  const app = await build(t, { SANDBOX: 'none' }, { logger })
  const res = await app.inject({ url: '/v1/sessions?limit=1', headers: { ...auth(), cookie: 'sid=cookie-value', 'x-api-key': 'header-key' } })
  t.equal(res.statusCode, 200)
  const requestLine = lines.find((l) => l.includes('request completed'))
  t.ok(requestLine, 'the request is logged')
  for (const value of [ADMIN_KEY, 'cookie-value', 'header-key']) t.notOk(requestLine!.includes(value), `no ${value} in the request line`)

  lines.length = 0
  const err = Object.assign(new Error('upstream refused'), { apiKey: 'sk-error', headers: { authorization: 'Bearer sk-header' } })
  logger.warn({ err, token: 'tok-field', password: 'pw-field' }, 'failed')
  for (const value of ['sk-error', 'sk-header', 'tok-field', 'pw-field']) t.notOk(lines[0]!.includes(value), `${value} is redacted`)
  t.match(lines[0], /upstream refused/, 'the rest of the line stays')
})
