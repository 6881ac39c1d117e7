import t, { type Test } from 'tap'
import yazl from 'yazl'
import { startFakeUpstream, text, toolCall } from '../fakes/upstream.js'
import { auth, build } from '../helpers/build.js'
import { freshDatabase } from '../helpers/postgres.js'

const KEY_NAME = 'tenant-b'

/** A zip of the entries; `raw` names replace placeholders of the same length afterwards (yazl refuses hostile names). */
async function zipOf(entries: { name: string; data: string | Buffer; mode?: number; raw?: string }[]): Promise<Buffer> {
  const zip = new yazl.ZipFile()
  for (const e of entries) zip.addBuffer(Buffer.from(e.data), e.name, e.mode ? { mode: e.mode } : {})
  zip.end()
  const parts: Buffer[] = []
  for await (const part of zip.outputStream) parts.push(part as Buffer)
  let bytes = Buffer.concat(parts).toString('latin1')
  for (const e of entries) if (e.raw) bytes = bytes.replaceAll(e.name, e.raw)
  return Buffer.from(bytes, 'latin1')
}

/** An export → import round trip on the store `env` selects. */
async function roundTrip(t: Test, env: Record<string, string>) {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none', ...env })
  upstream.script(toolCall({ language: 'python', code: 'import os\nos.makedirs("notes", exist_ok=True)\nopen("notes/a.txt", "w").write("hello")\nprint(6*7)' }), text('It is 42.'))
  const chat = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [{ role: 'user', content: 'six times seven?' }] } })
  t.equal(chat.statusCode, 200, chat.body)
  const id = chat.json().session_id
  await app.inject({ method: 'PUT', url: `/v1/sessions/${id}/files/content?path=data/b.bin`, headers: { ...auth(), 'content-type': 'application/octet-stream' }, payload: Buffer.from([0, 1, 2, 255]) })

  const exported = await app.inject({ method: 'GET', url: `/v1/sessions/${id}/export`, headers: auth() })
  t.equal(exported.statusCode, 200)
  const document = exported.json()
  t.match(document, { format: 'oi-server.session', version: 1, kernel_state: 'not_exported', session: { id }, settings: { auto_run: true } })
  t.same(document.messages.map((m: { role: string; type: string }) => `${m.role}/${m.type}`), ['user/message', 'assistant/code', 'computer/console', 'assistant/message'])
  t.ok(document.events.some((e: { type: string }) => e.type === 'run_finished'))

  const zipped = await app.inject({ method: 'GET', url: `/v1/sessions/${id}/export?workspace=true`, headers: auth() })
  t.equal(zipped.statusCode, 200)
  t.equal(zipped.headers['content-type'], 'application/zip')

  // Imported by another tenant, from the zip: its own session, same conversation and files.
  const key = (await app.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload: { name: KEY_NAME } })).json().key
  const imported = await app.inject({ method: 'POST', url: '/v1/sessions/import', headers: { ...auth(key), 'content-type': 'application/zip' }, payload: zipped.rawPayload })
  t.equal(imported.statusCode, 201, imported.body)
  const copy = imported.json().session_id
  t.not(copy, id)
  t.match(imported.json().metadata, { source: 'import', imported_from: id })
  const messages = (await app.inject({ url: `/v1/sessions/${copy}/messages?limit=100`, headers: auth(key) })).json().messages
  t.same(
    messages.map((m: { role: string; type: string; content: unknown }) => [m.role, m.type, m.content]),
    document.messages.map((m: { role: string; type: string; content: unknown }) => [m.role, m.type, m.content]),
  )
  t.notOk(messages.some((m: { id: string }) => document.messages.some((o: { id: string }) => o.id === m.id)), 'messages get new ids')
  const file = await app.inject({ url: `/v1/sessions/${copy}/files/content?path=notes/a.txt`, headers: auth(key) })
  t.equal(file.body, 'hello')
  const binary = await app.inject({ url: `/v1/sessions/${copy}/files/content?path=data/b.bin`, headers: auth(key) })
  t.same([...binary.rawPayload], [0, 1, 2, 255])
  const events = (await app.inject({ url: `/v1/sessions/${copy}/events?limit=100`, headers: auth(key) })).json().events
  t.match(events.at(-1), { type: 'session_imported', data: { from: id, files: 2 } })
  t.equal((await app.inject({ url: `/v1/sessions/${copy}`, headers: auth() })).statusCode, 404, 'owned by the importing tenant only')

  // The JSON export imports too (no workspace), and the agent continues from the history.
  const fromJson = await app.inject({ method: 'POST', url: '/v1/sessions/import', headers: auth(), payload: document })
  t.equal(fromJson.statusCode, 201)
  upstream.script(text('Still 42.'))
  const next = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id: fromJson.json().session_id, messages: [{ role: 'user', content: 'again?' }] } })
  t.equal(next.statusCode, 200)
  t.match(JSON.stringify(upstream.requests.at(-1)?.body.messages), /six times seven/)
  return app
}

t.test('export → import round trip on SQLite', async (t) => {
  await roundTrip(t, {})
})

const adminUrl = process.env.DATABASE_URL
t.test('export → import round trip on PostgreSQL', { skip: adminUrl ? false : 'DATABASE_URL is not set' }, async (t) => {
  await roundTrip(t, { DATABASE_URL: await freshDatabase(t, adminUrl!, 'oi_transfer') })
})

t.test('hostile imports are refused and leave nothing behind', async (t) => {
  const app = await build(t, { SANDBOX: 'none', BODY_LIMIT: '65536' })
  const created = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json().session_id
  const document = (await app.inject({ url: `/v1/sessions/${created}/export`, headers: auth() })).json()
  const before = (await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions.length
  const json = JSON.stringify(document)
  const cases: [string, Buffer, number, string][] = [
    ['escaping name', await zipOf([{ name: 'session.json', data: json }, { name: 'workspace/XX/XX/etc/x', raw: 'workspace/../../etc/x', data: 'x' }]), 400, 'invalid_archive'],
    ['absolute name', await zipOf([{ name: 'session.json', data: json }, { name: 'Xetc/passwd', raw: '/etc/passwd', data: 'x' }]), 400, 'invalid_archive'],
    ['outside workspace/', await zipOf([{ name: 'session.json', data: json }, { name: 'other.txt', data: 'x' }]), 400, 'invalid_archive'],
    ['symlink entry', await zipOf([{ name: 'session.json', data: json }, { name: 'workspace/link', data: '/etc/passwd', mode: 0o120777 }]), 400, 'invalid_archive'],
    ['no session.json', await zipOf([{ name: 'workspace/a', data: 'x' }]), 400, 'invalid_archive'],
    ['not a zip', Buffer.from('PK but not really'), 400, 'invalid_archive'],
    ['not an export', await zipOf([{ name: 'session.json', data: '{"format":"other"}' }]), 400, 'invalid_export'],
    ['too large', Buffer.alloc(70_000), 413, 'payload_too_large'],
  ]
  for (const [name, body, status, code] of cases) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/import', headers: { ...auth(), 'content-type': 'application/zip' }, payload: body })
    t.equal(res.statusCode, status, `${name}: ${res.body}`)
    t.equal(res.json().error.code, code, name)
  }
  const wrongType = await app.inject({ method: 'POST', url: '/v1/sessions/import', headers: { ...auth(), 'content-type': 'text/plain' }, payload: 'x' })
  t.equal(wrongType.statusCode, 415)
  const badMessage = await app.inject({ method: 'POST', url: '/v1/sessions/import', headers: auth(), payload: { ...document, messages: [{ role: 'root', type: 'message', content: 'x' }] } })
  t.equal(badMessage.statusCode, 400)
  t.equal((await app.inject({ method: 'POST', url: '/v1/sessions/import', payload: document })).statusCode, 401)
  t.equal((await app.inject({ url: '/v1/sessions/00000000-0000-4000-8000-000000000000/export', headers: auth() })).statusCode, 404)
  t.equal((await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions.length, before, 'no session was left behind')
})
