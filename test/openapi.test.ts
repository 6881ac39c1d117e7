import { execFile } from 'node:child_process'
import { readFileSync, symlinkSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'
import { startFakeUpstream, text } from './fakes/upstream.js'
import { ADMIN_KEY, auth, build, tempDir, type Tap } from './helpers/build.js'

const run = promisify(execFile)
const bin = (name: string) => resolve('node_modules/.bin', name)
// no telemetry and no update check: the linters must not need the network
const env = { ...process.env, REDOCLY_TELEMETRY: 'off', REDOCLY_SUPPRESS_UPDATE_NOTICE: 'true', NO_COLOR: '1' }

/** A CLI's output, whatever its exit code (the linters exit 1 when they find errors). */
async function cli(file: string, args: string[], cwd: string): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(file, args, { cwd, env, maxBuffer: 64 * 1024 * 1024 })
    return { code: 0, stdout, stderr }
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string }
    if (typeof e.code !== 'number') throw err
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' }
  }
}

type Operation = {
  operationId: string
  parameters?: { name: string; in: string; required?: boolean; schema: { default?: unknown } }[]
  requestBody?: { required?: boolean; content: Record<string, { example?: unknown; schema?: unknown }> }
  responses: Record<string, { description: string; content?: Record<string, unknown> }>
}

async function documented(t: Tap, env: Record<string, string> = {}) {
  const app = await build(t, env)
  const doc = (await app.inject({ url: '/openapi.json' })).json() as { paths: Record<string, Record<string, Operation>> }
  const operations = new Map<string, Operation & { method: string; path: string }>()
  for (const [path, item] of Object.entries(doc.paths))
    for (const [method, op] of Object.entries(item)) operations.set(op.operationId, { ...op, method: method.toUpperCase(), path })
  return { app, doc, operations }
}

t.test('Redocly (recommended) and Spectral (spectral:oas) find 0 errors in the document', async (t) => {
  const { doc } = await documented(t)
  const dir = tempDir(t, 'oi-openapi-lint-')
  const file = join(dir, 'openapi.json')
  writeFileSync(file, JSON.stringify(doc, null, 2))
  writeFileSync(join(dir, '.spectral.yaml'), 'extends: ["spectral:oas"]\n')

  const redocly = await cli(bin('redocly'), ['lint', file, '--extends=recommended', '--format=json'], dir)
  const report = JSON.parse(redocly.stdout) as { totals: { errors: number; warnings: number }; problems: { ruleId: string; severity: string; message: string }[] }
  const summary = await cli(bin('redocly'), ['lint', file, '--extends=recommended', '--format=summary'], dir)
  // stderr opens with a boxed notice (Node 20 support ending) that says nothing about the document
  const verdict = summary.stderr.split('\n').filter((line) => line.trim() && !/[║╔╚]/.test(line))
  t.comment(`redocly lint --extends=recommended:\n${[...verdict, summary.stdout.trim()].join('\n')}`)
  t.same(
    report.problems.filter((p) => p.severity === 'error').map((p) => `${p.ruleId}: ${p.message}`),
    [],
    'Redocly reports no errors',
  )
  t.equal(report.totals.errors, 0)
  t.equal(redocly.code, 0, 'redocly lint passes')

  const spectral = await cli(bin('spectral'), ['lint', file, '--ruleset', join(dir, '.spectral.yaml'), '--format', 'json', '--quiet'], dir)
  const results = JSON.parse(spectral.stdout || '[]') as { code: string; severity: number; message: string; path: string[] }[]
  const counts = new Map<string, number>()
  for (const r of results) counts.set(`${['error', 'warning', 'info', 'hint'][r.severity]} ${r.code}`, (counts.get(`${['error', 'warning', 'info', 'hint'][r.severity]} ${r.code}`) ?? 0) + 1)
  const errors = results.filter((r) => r.severity === 0)
  t.comment(
    `spectral lint (spectral:oas): ${errors.length} errors, ${results.length - errors.length} warnings/infos\n` +
      [...counts].map(([rule, n]) => `  ${rule}: ${n}`).join('\n'),
  )
  t.same(errors.map((r) => `${r.code} at ${r.path.join('.')}: ${r.message}`), [], 'Spectral reports no errors')
  t.equal(spectral.code, 0, 'spectral lint passes (fail severity: error)')
})

t.test('the document: streams, optional bodies, defaulted parameters, model ids', async (t) => {
  const { operations } = await documented(t)
  for (const id of ['runChat', 'executeCode', 'createChatCompletion']) {
    const ok = operations.get(id)!.responses['200']!
    t.ok(ok.content?.['application/json'], `${id} answers JSON`)
    t.match(ok.content?.['text/event-stream'], { schema: { anyOf: Array } }, `${id} documents its event stream and the events' shapes`)
  }
  t.equal(operations.get('createSession')!.requestBody!.required, false, 'POST /v1/sessions may have no body')
  t.equal(operations.get('restartKernels')!.requestBody!.required, false, 'restart may have no body')
  t.equal(operations.get('executeCode')!.requestBody!.required, true)
  for (const op of operations.values())
    for (const p of op.parameters ?? []) if (p.schema.default !== undefined) t.notOk(p.required, `${op.operationId} ${p.name} has a default, so is not required`)
  const model = operations.get('getModel')!
  t.equal(model.path, '/v1/models/{model}')
  t.match(model.parameters, [{ name: 'model', in: 'path', required: true }])
})

t.test('every JSON request body has an example, without placeholders, that the server accepts', async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const { app: live, operations } = await documented(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const session = (await live.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json().session_id as string

  // confirm answers 409 unless a run waits for it: the example is still a valid body
  const expected: Record<string, number[]> = { confirmRun: [409] }
  const checked: string[] = []
  for (const op of operations.values()) {
    const media = op.requestBody?.content['application/json']
    if (!op.requestBody || !media) continue
    t.not(media.example, undefined, `${op.operationId} has an example`)
    t.notMatch(JSON.stringify(media.example), /"string"|additionalProp/, `${op.operationId}: no placeholders`)
    if (op.operationId === 'runChat' || op.operationId === 'createChatCompletion') upstream.script(text('Hello!'))
    const url = op.path.replace('{id}', session).replace('{name}', 'API_TOKEN')
    const res = await live.inject({ method: op.method as 'POST', url, headers: auth(), payload: media.example as object })
    const ok = expected[op.operationId] ?? [200, 201, 204]
    t.ok(ok.includes(res.statusCode), `${op.operationId} ${op.method} ${op.path} with its example → ${res.statusCode}`, { body: res.body })
    checked.push(op.operationId)
    if (op.operationId === 'executeCode') t.match(res.json(), { exit_code: 0, outputs: [{ type: 'console', content: /^2\s*$/ }] }, 'print(1+1) prints 2')
    if (op.operationId === 'runChat') t.match(res.json(), { message: { content: 'Hello!' } })
  }
  t.ok(checked.length >= 10, `${checked.length} bodies tried: ${checked.join(', ')}`)
})

/** The README's calls, written against the generated types: this file must compile. */
const CLIENT = `
import createClient from 'openapi-fetch'
import type { paths } from './schema.js'

const [baseUrl, key] = process.argv.slice(2) as [string, string]
const client = createClient<paths>({ baseUrl, headers: { Authorization: \`Bearer \${key}\` } })

// Every call the README shows; only \`main\` below is run.
export async function readmeCalls(id: string, messageId: string, keyId: string) {
  await client.GET('/v1/health')
  await client.GET('/metrics', { parseAs: 'text' })
  await client.POST('/v1/sessions')
  await client.POST('/v1/sessions', { body: { title: 'Plots', metadata: { team: 'data' } } })
  await client.GET('/v1/sessions', { params: { query: { limit: 20 } } })
  await client.GET('/v1/sessions/{id}', { params: { path: { id } } })
  await client.PATCH('/v1/sessions/{id}', { params: { path: { id } }, body: { title: 'Renamed' } })
  await client.GET('/v1/sessions/{id}/messages', { params: { path: { id }, query: { limit: 100, after: messageId } } })
  await client.DELETE('/v1/sessions/{id}/messages', { params: { path: { id } } })
  await client.DELETE('/v1/sessions/{id}', { params: { path: { id } } })
  await client.GET('/v1/languages')
  await client.POST('/v1/sessions/{id}/execute', { params: { path: { id } }, body: { language: 'python', code: 'import math\\nmath.pi * 2' } })
  await client.POST('/v1/sessions/{id}/execute', { params: { path: { id } }, body: { language: 'shell', code: 'echo 1', stream: true }, parseAs: 'stream' })
  await client.POST('/v1/sessions/{id}/interrupt', { params: { path: { id } } })
  await client.POST('/v1/sessions/{id}/restart', { params: { path: { id } } })
  await client.GET('/v1/sessions/{id}/files', { params: { path: { id }, query: { path: '', limit: 1000 } } })
  await client.GET('/v1/sessions/{id}/files', { params: { path: { id }, query: { cursor: 'next' } } })
  await client.PUT('/v1/sessions/{id}/files/content', {
    params: { path: { id }, query: { path: 'in/data.csv' } },
    body: 'a,b\\n1,2\\n',
    bodySerializer: (body) => body,
    headers: { 'content-type': 'application/octet-stream' },
  })
  await client.GET('/v1/sessions/{id}/files/content', { params: { path: { id }, query: { path: 'out.png' } }, parseAs: 'blob' })
  await client.DELETE('/v1/sessions/{id}/files/content', { params: { path: { id }, query: { path: 'in' } } })
  await client.POST('/v1/sessions/{id}/files/upload', {
    params: { path: { id }, query: { path: 'docs' } },
    body: { file: ['a.txt', 'b.txt'] },
    bodySerializer: (body) => {
      const form = new FormData()
      for (const name of body.file) form.append('file', new Blob(['text']), name)
      return form
    },
  })
  await client.GET('/v1/sessions/{id}/files/archive', { params: { path: { id } }, parseAs: 'blob' })
  await client.POST('/v1/chat', {
    body: { messages: [{ role: 'user', type: 'message', content: 'What is the 20th Fibonacci number?' }], config: { llm: { model: 'gpt-4o-mini', temperature: 0 } } },
  })
  await client.POST('/v1/chat', { body: { session_id: id, stream: true, messages: [{ role: 'user', content: 'Plot sin(x)' }] }, parseAs: 'stream' })
  await client.POST('/v1/sessions/{id}/stop', { params: { path: { id } } })
  await client.POST('/v1/sessions/{id}/confirm', { params: { path: { id } }, body: { approve: true } })
  await client.GET('/v1/models')
  await client.POST('/v1/chat/completions', { body: { model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Hi' }] } })
  await client.GET('/v1/sessions/{id}/events', { params: { path: { id }, query: { start_id: 1, end_id: 50, limit: 100 } } })
  await client.POST('/v1/keys', { body: { name: 'app-1', expires_at: '2027-01-01T00:00:00Z' } })
  await client.GET('/v1/keys')
  await client.DELETE('/v1/keys/{id}', { params: { path: { id: keyId } } })
  await client.GET('/v1/settings')
  await client.PATCH('/v1/settings', { body: { temperature: 0.2, max_tokens: null } })
  await client.PUT('/v1/secrets/{name}', { params: { path: { name: 'API_TOKEN' } }, body: { value: 's3cr3t' } })
  await client.GET('/v1/secrets')
  await client.DELETE('/v1/secrets/{name}', { params: { path: { name: 'API_TOKEN' } } })
}

async function main() {
  const created = await client.POST('/v1/sessions', { body: { title: 'From the generated client' } })
  if (!created.data) throw new Error(\`create: \${created.response.status} \${JSON.stringify(created.error)}\`)
  const sessionId: string = created.data.session_id
  const listed = await client.GET('/v1/sessions')
  const titles: (string | null)[] = (listed.data?.sessions ?? []).map((s) => s.title)
  const model = await client.GET('/v1/models/{model}', { params: { path: { model: 'bedrock/anthropic.claude-3' } } })
  console.log(JSON.stringify({ status: created.response.status, sessionId, listStatus: listed.response.status, titles, model: model.data?.id ?? model.response.status }))
}

await main()
`

t.test('a client generated with openapi-typescript + openapi-fetch compiles for the README calls and runs', async (t) => {
  const { default: openapiTS, astToString } = await import('openapi-typescript')
  const app = await build(t, { MODELS: 'gpt-4o-mini,bedrock/anthropic.claude-3' })
  const dir = tempDir(t, 'oi-openapi-client-')
  const doc = (await app.inject({ url: '/openapi.json' })).json()
  writeFileSync(join(dir, 'schema.d.ts'), astToString(await openapiTS(doc)))
  symlinkSync(resolve('node_modules'), join(dir, 'node_modules'), 'dir')
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module' }))
  writeFileSync(join(dir, 'client.ts'), CLIENT)
  writeFileSync(
    join(dir, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: { target: 'es2022', module: 'nodenext', moduleResolution: 'nodenext', strict: true, noEmitOnError: true, skipLibCheck: true, types: ['node'] },
      files: ['client.ts', 'schema.d.ts'],
    }),
  )
  const tsc = await cli(bin('tsc'), ['-p', dir], dir)
  t.equal(tsc.code, 0, 'tsc compiles the client', { output: tsc.stdout + tsc.stderr })
  if (tsc.code !== 0) return

  const address = await app.listen({ port: 0, host: '127.0.0.1' })
  const { stdout } = await run(process.execPath, [join(dir, 'client.js'), address, ADMIN_KEY], { cwd: dir, env })
  const out = JSON.parse(stdout)
  t.match(out, { status: 201, sessionId: String, listStatus: 200, titles: ['From the generated client'] }, 'created a session and listed it')
  t.equal(out.model, 'bedrock/anthropic.claude-3', 'GET /v1/models/{model} with a slash in the id (sent as %2F)')
  t.ok(readFileSync(join(dir, 'schema.d.ts'), 'utf8').includes('"/v1/models/{model}"'))
})
