import { Writable } from 'node:stream'
import { pino } from 'pino'
import pretty from 'pino-pretty'
import t from 'tap'
import { PRETTY } from '../../services/logger.js'
import { auth, build } from '../helpers/build.js'

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
