import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import Sqlite from 'better-sqlite3'
import pino from 'pino'
import t from 'tap'
import { buildApp } from '../../app.js'
import { loadConfig } from '../../config.js'
import { newApiKey } from '../../services/auth.js'
import { SecretBox } from '../../services/crypto.js'
import { startFakeUpstream, text, toolCall } from '../fakes/upstream.js'
import { ADMIN_KEY, auth, build, type FastifyInstance, type Tap, tempDir } from '../helpers/build.js'
import { parseSse } from '../helpers/sse.js'

const VALUE = 's3cr3t-value-123'
const MASK = '[secret:API_TOKEN]'
const user = (content: string) => ({ role: 'user', type: 'message', content })

async function setup(t: Tap, env: Record<string, string> = {}) {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const dataDir = tempDir(t)
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none', DATA_DIR: dataDir, ...env })
  return { app, upstream, dataDir }
}

async function tenantKey(app: FastifyInstance): Promise<string> {
  const { key, record } = newApiKey('tenant', null)
  await app.store.createApiKey(record)
  return key
}

const putSecret = (app: FastifyInstance, name: string, value: unknown, key?: string) =>
  app.inject({ method: 'PUT', url: `/v1/secrets/${name}`, headers: auth(key), payload: { value } })

const newSession = async (app: FastifyInstance, key?: string): Promise<string> =>
  (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(key) })).json().session_id

/** Every row of every table, as text, read with a separate connection from the database file. */
function rawRows(dataDir: string): Record<string, string> {
  const db = new Sqlite(join(dataDir, 'oi-server.db'), { readonly: true })
  try {
    const tables = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all() as { name: string }[]
    return Object.fromEntries(tables.map(({ name }) => [name, JSON.stringify(db.prepare(`SELECT * FROM "${name}"`).all())]))
  } finally {
    db.close()
  }
}

/** Every file under the data dir (database, WAL, key file, workspaces), as bytes. */
function filesUnder(dir: string): { path: string; bytes: Buffer }[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => {
      const path = join(e.parentPath, e.name)
      return { path, bytes: readFileSync(path) }
    })
}

t.test('PUT, GET (names only), DELETE; names must be environment variable names', async (t) => {
  const { app } = await setup(t)
  const put = await putSecret(app, 'API_TOKEN', VALUE)
  t.equal(put.statusCode, 204)
  t.equal(put.body, '')
  t.equal((await putSecret(app, '_under_score9', 'another-value')).statusCode, 204)

  const list = await app.inject({ url: '/v1/secrets', headers: auth() })
  t.equal(list.statusCode, 200)
  t.equal(list.headers['cache-control'], 'no-store')
  const { secrets } = list.json()
  t.same(
    secrets.map((s: { name: string }) => s.name),
    ['API_TOKEN', '_under_score9'],
  )
  for (const s of secrets) {
    t.same(Object.keys(s).sort(), ['created_at', 'name', 'updated_at'], 'names and times, never values')
    t.match(s.created_at, /Z$/)
  }
  t.notMatch(list.body, VALUE)
  t.notMatch(list.body, 'another-value')

  // PUT again replaces the value and keeps created_at
  const before = secrets[0]
  await new Promise((r) => setTimeout(r, 5))
  t.equal((await putSecret(app, 'API_TOKEN', 'rotated-value-456')).statusCode, 204)
  const after = (await app.inject({ url: '/v1/secrets', headers: auth() })).json().secrets[0]
  t.equal(after.created_at, before.created_at)
  t.ok(after.updated_at > before.updated_at, 'updated_at moves')
  t.same((await app.secrets.forTenant('admin')).env, { API_TOKEN: 'rotated-value-456', _under_score9: 'another-value' })

  const del = await app.inject({ method: 'DELETE', url: '/v1/secrets/_under_score9', headers: auth() })
  t.equal(del.statusCode, 204)
  t.equal(del.body, '')
  t.same(
    (await app.inject({ url: '/v1/secrets', headers: auth() })).json().secrets.map((s: { name: string }) => s.name),
    ['API_TOKEN'],
  )
  const again = await app.inject({ method: 'DELETE', url: '/v1/secrets/_under_score9', headers: auth() })
  t.equal(again.statusCode, 404)
  t.match(again.json(), { error: { type: 'not_found_error', code: 'not_found' } })
  t.equal((await app.inject({ method: 'DELETE', url: '/v1/secrets/NEVER_SET', headers: auth() })).statusCode, 404)

  t.equal((await putSecret(app, `L${'o'.repeat(98)}G`, 'long-name-value')).statusCode, 204, 'names up to 100 characters')
  await app.inject({ method: 'DELETE', url: `/v1/secrets/L${'o'.repeat(98)}G`, headers: auth() })
  for (const name of ['1ABC', 'WITH-DASH', 'has space', 'dot.name', '%C3%A9t%C3%A9', 'A%00B']) {
    const res = await putSecret(app, name, 'value-x')
    t.equal(res.statusCode, 400, name)
    t.match(res.json(), { error: { type: 'validation_error', code: 'invalid_request', param: 'name' } }, name)
  }
  // Names the dynamic loader, libc, the interpreters or the server read: refused whatever their case.
  for (const name of ['LD_PRELOAD', 'LD_LIBRARY_PATH', 'ld_audit', 'GCONV_PATH', 'LOCPATH', 'GLIBC_TUNABLES', 'MALLOC_CHECK_', 'HOSTALIASES', 'RES_OPTIONS', 'PYTHONPATH', 'PYTHONSTARTUP', 'NODE_OPTIONS', 'BASH_ENV', 'ENV', 'BASH_FUNC_x', 'PATH', 'HOME']) {
    const res = await putSecret(app, name, 'value-x')
    t.equal(res.statusCode, 400, name)
    t.match(res.json(), { error: { type: 'validation_error', code: 'invalid_request', param: 'name' } }, name)
  }
  for (const [payload, param] of [
    [{ value: '' }, 'value'],
    [{ value: 'a\u0000b' }, 'value'],
    [{}, 'value'],
    [{ value: 'x'.repeat(65_537) }, 'value'],
  ] as const) {
    const res = await app.inject({ method: 'PUT', url: '/v1/secrets/OK_NAME', headers: auth(), payload })
    t.equal(res.statusCode, 400, JSON.stringify(payload).slice(0, 40))
    t.match(res.json(), { error: { type: 'validation_error', param } })
  }
  const badJson = await app.inject({ method: 'PUT', url: '/v1/secrets/OK_NAME', headers: { ...auth(), 'content-type': 'application/json' }, payload: '{"value":' })
  t.equal(badJson.statusCode, 400)
  t.match(badJson.json(), { error: { code: 'invalid_json' } })
  t.same(
    (await app.inject({ url: '/v1/secrets', headers: auth() })).json().secrets.map((s: { name: string }) => s.name),
    ['API_TOKEN'],
    'no invalid request stored anything',
  )
})

t.test('secrets: 401 on every route; other tenants see nothing and cannot delete', async (t) => {
  const { app } = await setup(t)
  await putSecret(app, 'API_TOKEN', VALUE)
  for (const [method, url] of [
    ['GET', '/v1/secrets'],
    ['PUT', '/v1/secrets/API_TOKEN'],
    ['DELETE', '/v1/secrets/API_TOKEN'],
  ] as const) {
    const res = await app.inject({ method, url, payload: method === 'PUT' ? { value: 'overwrite' } : undefined })
    t.equal(res.statusCode, 401, `${method} ${url}`)
    t.match(res.json(), { error: { type: 'auth_error', code: 'missing_api_key' } })
    const wrong = await app.inject({ method, url, headers: auth('wrong'), payload: method === 'PUT' ? { value: 'overwrite' } : undefined })
    t.equal(wrong.statusCode, 401)
  }
  const other = await tenantKey(app)
  t.same((await app.inject({ url: '/v1/secrets', headers: auth(other) })).json(), { secrets: [] })
  const del = await app.inject({ method: 'DELETE', url: '/v1/secrets/API_TOKEN', headers: auth(other) })
  t.equal(del.statusCode, 404)
  // the other tenant's PUT of the same name is its own secret
  t.equal((await putSecret(app, 'API_TOKEN', 'tenant-b-value', other)).statusCode, 204)
  t.same((await app.secrets.forTenant('admin')).env, { API_TOKEN: VALUE }, "the admin's value is untouched")
})

t.test('stored encrypted: the row holds AES-GCM ciphertext; the key file is 0600', async (t) => {
  const { app, dataDir } = await setup(t)
  await putSecret(app, 'API_TOKEN', VALUE)
  const keyFile = join(dataDir, 'secrets.key')
  t.ok(existsSync(keyFile), 'a key file was made in DATA_DIR')
  t.equal(statSync(keyFile).mode & 0o777, 0o600)
  t.match(readFileSync(keyFile, 'utf8'), /^[0-9a-f]{64}$/)

  const rows = rawRows(dataDir)
  t.notMatch(rows.secrets, VALUE)
  const [row] = JSON.parse(rows.secrets!) as { tenant_id: string; name: string; ciphertext: string }[]
  t.match(row, { tenant_id: 'admin', name: 'API_TOKEN', ciphertext: /^v1\.[\w-]+\.[\w-]+\.[\w-]+$/ })
  const box = new SecretBox(Buffer.from(readFileSync(keyFile, 'utf8'), 'hex'))
  t.equal(box.open(row!.ciphertext, 'admin/API_TOKEN'), VALUE, 'the key file opens it')
  t.throws(() => box.open(row!.ciphertext, 'key:other/API_TOKEN'), 'bound to its tenant and name')
  for (const file of filesUnder(dataDir)) t.notOk(file.bytes.includes(VALUE), `${file.path} does not hold the value`)
})

t.test('SECRETS_KEY from the environment is used instead of a key file', async (t) => {
  const hex = 'ab'.repeat(32)
  const { app, dataDir } = await setup(t, { SECRETS_KEY: hex })
  await putSecret(app, 'API_TOKEN', VALUE)
  t.notOk(existsSync(join(dataDir, 'secrets.key')))
  const [row] = JSON.parse(rawRows(dataDir).secrets!) as { ciphertext: string }[]
  t.equal(new SecretBox(Buffer.from(hex, 'hex')).open(row!.ciphertext, 'admin/API_TOKEN'), VALUE)
})

t.test('masking: the value never leaves the kernel unmasked', async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const dataDir = tempDir(t)
  // the server's wiring (server.ts): every log line goes through the secrets service
  const logLines: string[] = []
  let mask = (line: string) => line
  const rawLog: string[] = []
  const logger = pino({ level: 'trace' }, { write: (line: string) => (rawLog.push(line), logLines.push(mask(line))) })
  const config = loadConfig({
    API_KEY: ADMIN_KEY,
    DATA_DIR: dataDir,
    RATE_LIMIT_PER_MINUTE: '1000',
    SESSION_RATE_LIMIT_PER_MINUTE: '1000',
    LLM_BASE_URL: upstream.url,
    SANDBOX: 'none',
  })
  const app = await buildApp(config, { logger })
  t.teardown(() => app.close())
  mask = app.secrets.redactAll

  t.equal((await putSecret(app, 'API_TOKEN', VALUE)).statusCode, 204)
  const bodies: string[] = []
  const printInPython = 'import os\nprint("token:", os.environ["API_TOKEN"])'
  // one character at a time, flushed: the value reaches the server split over many reads
  const dribble = 'import os, sys, time\nfor c in os.environ["API_TOKEN"]:\n    sys.stdout.write(c); sys.stdout.flush(); time.sleep(0.02)\nprint()'

  // 1. a streamed turn: the user quotes the value, the code prints it, the model repeats it
  upstream.script(
    toolCall({ language: 'python', code: printInPython }),
    toolCall({ language: 'python', code: dribble }),
    text(`Your token is ${VALUE}, as printed.`),
  )
  const streamed = await app.inject({
    method: 'POST',
    url: '/v1/chat',
    headers: auth(),
    payload: { messages: [user(`my token is ${VALUE}; print it`)], stream: true },
  })
  t.equal(streamed.statusCode, 200)
  bodies.push(streamed.body)
  const session = streamed.headers['x-session-id'] as string
  const chunks = parseSse(streamed.body)
    .filter((e) => e.event === 'message')
    .map((e) => JSON.parse(e.data))
  const consoleText = chunks
    .filter((c) => c.type === 'console' && typeof c.content === 'string')
    .map((c) => c.content)
    .join('')
  t.match(consoleText, `token: ${MASK}`, 'the printed value is masked in the stream')
  t.equal(parseSse(streamed.body).at(-1)?.event, 'done')

  // 2. the same through the JSON answer
  upstream.script(toolCall({ language: 'python', code: printInPython }), text(`Again: ${VALUE}`))
  const plain = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id: session, messages: [user('again')] } })
  t.equal(plain.statusCode, 200)
  bodies.push(plain.body)
  const answer = plain.json()
  t.match(answer.messages, [{ type: 'code' }, { type: 'console', content: `token: ${MASK}\n` }, { type: 'message', content: `Again: ${MASK}` }])
  t.equal(answer.message.content, `Again: ${MASK}`)

  // 3. straight into the kernels: shell and python, JSON and SSE
  const execute = (language: string, code: string, stream = false) =>
    app.inject({ method: 'POST', url: `/v1/sessions/${session}/execute`, headers: auth(), payload: { language, code, stream } })
  const shell = await execute('shell', 'echo "shell: $API_TOKEN"')
  t.equal(shell.statusCode, 200)
  t.match(shell.json().outputs, [{ type: 'console', stream: 'stdout', content: `shell: ${MASK}\n` }])
  const shellStream = await execute('shell', 'echo "shell: $API_TOKEN"', true)
  t.match(shellStream.body, `shell: ${MASK}`)
  const split = await execute('python', dribble)
  t.equal(split.json().outputs.map((o: { content: string }) => o.content).join(''), `${MASK}\n`, 'split output is masked whole')
  const splitStream = await execute('python', dribble, true)
  const splitChunks = parseSse(splitStream.body)
    .filter((e) => e.event === 'message')
    .map((e) => JSON.parse(e.data).content ?? '')
    .join('')
  t.equal(splitChunks, `${MASK}\n`, 'split output is masked whole in the stream')
  const error = await execute('python', 'import os\nraise ValueError(os.environ["API_TOKEN"])')
  t.match(error.json().error, { name: 'ValueError', value: MASK })
  t.notMatch(error.json().error.traceback, VALUE)
  bodies.push(shell.body, shellStream.body, split.body, splitStream.body, error.body)

  // 4. the read side of the API
  const messages = await app.inject({ url: `/v1/sessions/${session}/messages?limit=100`, headers: auth() })
  const events = await app.inject({ url: `/v1/sessions/${session}/events?limit=100`, headers: auth() })
  bodies.push(messages.body, events.body)
  t.match(messages.body, MASK)
  t.match(events.body, MASK)
  t.ok(
    messages.json().messages.some((m: { role: string; content: string }) => m.role === 'user' && m.content === `my token is ${MASK}; print it`),
    "the user's own message is stored masked",
  )

  for (const [i, body] of bodies.entries()) t.notOk(body.includes(VALUE), `response ${i} does not contain the value`)

  // 5. what was sent to the model
  t.ok(upstream.requests.length >= 5)
  const sent = JSON.stringify(upstream.requests.map((r) => r.body))
  t.notOk(sent.includes(VALUE), 'no upstream request contains the value')
  t.match(sent, `token: ${MASK}`, 'the model saw the masked output')

  // 6. at rest: every table, and every byte under DATA_DIR (database, WAL, workspaces)
  const rows = rawRows(dataDir)
  for (const [table, text] of Object.entries(rows)) t.notOk(text.includes(VALUE), `table ${table} does not contain the value`)
  t.match(rows.messages, MASK)
  t.match(rows.events, MASK)
  for (const file of filesUnder(dataDir)) t.notOk(file.bytes.includes(VALUE), `${file.path} does not contain the value`)

  // 7. logs: nothing above logged the value; a line that does (an upstream error quoting a
  // prompt, say) is masked on its way out
  t.ok(logLines.length > 0)
  t.notOk(logLines.join('').includes(VALUE), 'no log line contains the value')
  app.log.warn({ detail: `upstream said: ${VALUE}` }, 'quoting a prompt')
  t.ok(rawLog.at(-1)!.includes(VALUE), 'the line was written with the value')
  t.match(JSON.parse(logLines.at(-1)!), { detail: `upstream said: ${MASK}`, msg: 'quoting a prompt' })
})

t.test("another tenant's kernel does not get the variable", async (t) => {
  const { app } = await setup(t)
  await putSecret(app, 'API_TOKEN', VALUE)
  const other = await tenantKey(app)
  const theirs = await newSession(app, other)
  const code = 'import os\nprint(os.environ.get("API_TOKEN", "absent"))'
  const res = await app.inject({ method: 'POST', url: `/v1/sessions/${theirs}/execute`, headers: auth(other), payload: { language: 'python', code } })
  t.match(res.json().outputs, [{ content: 'absent\n' }])
  const shell = await app.inject({
    method: 'POST',
    url: `/v1/sessions/${theirs}/execute`,
    headers: auth(other),
    payload: { language: 'shell', code: 'env | grep -c s3cr3t || true' },
  })
  t.match(shell.json().outputs, [{ content: '0\n' }])
  // and the owner's kernel does
  const mine = await newSession(app)
  const own = await app.inject({ method: 'POST', url: `/v1/sessions/${mine}/execute`, headers: auth(), payload: { language: 'python', code } })
  t.match(own.json().outputs, [{ content: `${MASK}\n` }])
  // a foreign session cannot be used to reach the owner's kernel
  const foreign = await app.inject({ method: 'POST', url: `/v1/sessions/${mine}/execute`, headers: auth(other), payload: { language: 'python', code } })
  t.equal(foreign.statusCode, 404)
})

t.test('a value changed or deleted after the kernel started stays masked in that kernel', async (t) => {
  const { app } = await setup(t)
  const session = await newSession(app)
  const run = async (code: string) =>
    (await app.inject({ method: 'POST', url: `/v1/sessions/${session}/execute`, headers: auth(), payload: { language: 'python', code } }))
      .json()
      .outputs.map((o: { content: string }) => o.content)
      .join('')
  await putSecret(app, 'API_TOKEN', VALUE)
  t.equal(await run('import os\nstarted_with = os.environ["API_TOKEN"]\nprint(started_with)'), `${MASK}\n`)
  // the kernel keeps the environment it started with
  await putSecret(app, 'API_TOKEN', 'rotated-value-456')
  t.equal(await run('print(started_with, os.environ["API_TOKEN"])'), `${MASK} ${MASK}\n`)
  await app.inject({ method: 'DELETE', url: '/v1/secrets/API_TOKEN', headers: auth() })
  const out = await run('print(started_with)')
  t.notOk(out.includes(VALUE), 'the old value is still masked after the secret is deleted')
  t.equal(out, `${MASK}\n`)
  // a new kernel gets the current secrets only
  await app.inject({ method: 'POST', url: `/v1/sessions/${session}/restart`, headers: auth() })
  t.equal(await run('import os\nprint(os.environ.get("API_TOKEN", "absent"))'), 'absent\n')
})
