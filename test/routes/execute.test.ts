import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync, readlinkSync, rmSync } from 'node:fs'
import { request } from 'node:http'
import { join } from 'node:path'
import t from 'tap'
import { newApiKey } from '../../services/auth.js'
import { descendants } from '../../services/kernels/processes.js'
import { ADMIN_KEY, auth, build, type FastifyInstance, type Tap } from '../helpers/build.js'
import { parseSse } from '../helpers/sse.js'

/** bubblewrap that can build the namespaces a kernel needs, or why not (the sandboxed tests are skipped). */
function bwrapSkip(): string | false {
  if (!existsSync('/usr/bin/bwrap')) return '/usr/bin/bwrap is not installed'
  const probe = spawnSync('/usr/bin/bwrap', ['--unshare-all', '--ro-bind', '/', '/', '--proc', '/proc', '--dev', '/dev', 'true'], { encoding: 'utf8', timeout: 10_000 })
  return probe.status === 0 ? false : `bubblewrap does not work here: ${(probe.stderr || probe.error?.message || `exit ${probe.status}`).trim()}`
}
const noBwrap = bwrapSkip()
const sandboxed = { skip: noBwrap }
// the figure test needs matplotlib in the interpreter the kernels run (PYTHON_BIN's default)
const noMatplotlib =
  spawnSync('/usr/bin/python3', ['-c', 'import matplotlib'], { timeout: 20_000 }).status === 0 ? false : 'matplotlib is not installed for /usr/bin/python3'

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])
const RESULT_KEYS = ['duration_ms', 'exit_code', 'outputs', 'state_lost', 'timed_out', 'truncated']

interface Lmc {
  id: string
  role: string
  type: string
  format?: string
  stream?: 'stdout' | 'stderr'
  content: string
  created_at: string
}

interface ExecBody {
  outputs: Lmc[]
  exit_code: number | null
  error?: { name: string; value: string; traceback: string }
  duration_ms: number
  timed_out: boolean
  state_lost: boolean
  truncated: boolean
}

async function setup(t: Tap, env: Record<string, string> = {}) {
  const app = await build(t, { SANDBOX: 'bwrap', EXEC_GRACE_MS: '1000', ...env })
  const session = await newSession(app)
  return { app, session, exec: (language: string, code: string, extra: object = {}) => execute(app, session, language, code, extra) }
}

async function newSession(app: FastifyInstance, key = ADMIN_KEY): Promise<string> {
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(key) })
  return res.json().session_id
}

async function execute(app: FastifyInstance, session: string, language: string, code: string, extra: object = {}) {
  const res = await app.inject({ method: 'POST', url: `/v1/sessions/${session}/execute`, headers: auth(), payload: { language, code, ...extra } })
  return {
    res,
    get body() {
      return res.json() as ExecBody
    },
  }
}

const text = (body: ExecBody, stream: 'stdout' | 'stderr') =>
  body.outputs
    .filter((o) => o.type === 'console' && o.stream === stream)
    .map((o) => o.content)
    .join('')

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

async function until(check: () => boolean, timeoutMs = 10_000): Promise<boolean> {
  for (const deadline = Date.now() + timeoutMs; !check(); await sleep(20)) if (Date.now() > deadline) return false
  return true
}

t.test('JSON result shape for every language and alias', sandboxed, async (t) => {
  const { exec } = await setup(t)
  const cases = [
    ['python', 'print("hello")'],
    ['py', 'print("hello")'],
    ['shell', 'echo hello'],
    ['bash', 'echo hello'],
    ['sh', 'echo hello'],
    ['javascript', 'console.log("hello")'],
    ['js', 'console.log("hello")'],
    ['node', 'console.log("hello")'],
    // The agent has always taken these from models; /execute takes them from the same table.
    ['zsh', 'echo hello'],
    ['nodejs', 'console.log("hello")'],
    ['Python3', 'print("hello")'],
  ]
  for (const [language, code] of cases) {
    const { res, body } = await exec(language!, code!)
    t.equal(res.statusCode, 200, language)
    t.match(res.headers['content-type'], /^application\/json/)
    t.same(Object.keys(body).sort(), RESULT_KEYS, `${language}: exactly the documented fields, no error`)
    t.match(body, { exit_code: 0, duration_ms: Number, timed_out: false, state_lost: false, truncated: false }, language)
    t.equal(body.outputs.length, 1, `${language}: one console message`)
    t.match(body.outputs[0], {
      id: /^[0-9a-f-]{36}$/,
      role: 'computer',
      type: 'console',
      format: 'output',
      stream: 'stdout',
      content: 'hello\n',
      created_at: /^\d{4}-\d\d-\d\dT.*Z$/,
    })
    t.ok(body.duration_ms >= 0)
  }
})

t.test('state persists between executions, per language', sandboxed, async (t) => {
  const { exec } = await setup(t)
  await exec('python', 'import math\nx = 41')
  t.match((await exec('py', 'print(x + 1, math.floor(2.5))')).body.outputs, [{ stream: 'stdout', content: '42 2\n' }])
  const value = (await exec('python', 'x * 2')).body
  t.match(value.outputs, [{ type: 'console', stream: 'stdout', content: '82' }], 'a trailing expression is shown as Jupyter does')

  await exec('shell', 'mkdir -p sub && cd sub && export GREETING=hi && counter=3')
  t.equal(text((await exec('bash', 'echo "$PWD $GREETING $counter"')).body, 'stdout'), '/workspace/sub hi 3\n')

  await exec('javascript', 'let n = 40\nconst add = (a) => a + n')
  t.match((await exec('js', 'add(2)')).body.outputs, [{ content: '42' }])
  t.match((await exec('node', 'await Promise.resolve(n + 1)')).body.outputs, [{ content: '41' }], 'top-level await')
})

t.test('stdout and stderr are separate console messages', sandboxed, async (t) => {
  const { exec } = await setup(t)
  // two pipes give no order between them: the pauses make the interleaving observable
  const py = (await exec('python', 'import sys, time\nprint("out 1")\ntime.sleep(0.1)\nprint("err 1", file=sys.stderr)\ntime.sleep(0.1)\nprint("out 2")')).body
  t.match(py.outputs, [
    { type: 'console', format: 'output', stream: 'stdout', content: 'out 1\n' },
    { type: 'console', format: 'output', stream: 'stderr', content: 'err 1\n' },
    { type: 'console', format: 'output', stream: 'stdout', content: 'out 2\n' },
  ])
  t.equal(py.outputs.length, 3)
  t.equal(new Set(py.outputs.map((o) => o.id)).size, 3, 'each message has its own id')

  const sh = (await exec('shell', 'echo to-out; echo to-err >&2')).body
  t.equal(text(sh, 'stdout'), 'to-out\n')
  t.equal(text(sh, 'stderr'), 'to-err\n')
  const js = (await exec('javascript', 'console.log("log"); console.error("warn")')).body
  t.equal(text(js, 'stdout'), 'log\n')
  t.equal(text(js, 'stderr'), 'warn\n')
})

t.test('a Python exception comes back as error {name, value, traceback}', sandboxed, async (t) => {
  const { exec } = await setup(t)
  const { res, body } = await exec('python', 'def check(v):\n    raise ValueError(f"bad value {v}")\n\ncheck(7)')
  t.equal(res.statusCode, 200)
  t.equal(body.exit_code, 1)
  t.match(body.error, { name: 'ValueError', value: 'bad value 7', traceback: /Traceback[\s\S]*line 4[\s\S]*line 2, in check[\s\S]*ValueError: bad value 7/ })
  t.notMatch(body.error!.traceback, /python_driver/, 'the driver frames are trimmed')
  t.match(text(body, 'stderr'), /ValueError: bad value 7/, 'the traceback is also shown on stderr')
  t.equal((await exec('python', 'print("still alive")')).body.exit_code, 0, 'the kernel survives the exception')

  const js = (await exec('js', 'throw new TypeError("nope")')).body
  t.match(js, { exit_code: 1, error: { name: 'TypeError', value: 'nope' } })
  const sh = (await exec('sh', 'false')).body
  t.equal(sh.exit_code, 1, 'a failing shell command gives its exit code')
  t.notOk(sh.error)
})

t.test('a matplotlib figure comes back as a base64.png image', { skip: noBwrap || noMatplotlib }, async (t) => {
  const { exec } = await setup(t)
  const { body } = await exec('python', 'import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title("chart")\nNone')
  t.equal(body.exit_code, 0)
  t.equal(text(body, 'stderr'), '', 'no warning on stderr (fontconfig finds its configuration in the sandbox)')
  const images = body.outputs.filter((o) => o.type === 'image')
  t.equal(images.length, 1)
  t.match(images[0], { role: 'computer', type: 'image', format: 'base64.png', id: String, created_at: String })
  const png = Buffer.from(images[0]!.content, 'base64')
  t.ok(png.subarray(0, 8).equals(PNG_SIGNATURE), 'PNG signature')
  t.ok(png.length > 1000, `a real picture (${png.length} bytes)`)
  t.equal(png.readUInt32BE(16) > 100 && png.readUInt32BE(20) > 100, true, 'IHDR says it has a size')
})

t.test('SSE: message chunks with start/end framing, then done', sandboxed, async (t) => {
  const { exec } = await setup(t)
  const { res } = await exec('python', 'import sys\nprint("one")\nprint("two", file=sys.stderr)\n6 * 7', { stream: true })
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^text\/event-stream/)
  t.ok(res.headers['x-request-id'], 'hook headers survive the hijack')
  t.ok(res.headers['x-ratelimit-limit'])
  const events = parseSse(res.body)
  t.same([...new Set(events.map((e) => e.event))], ['message', 'done'])
  const done = events.at(-1)!
  t.equal(done.event, 'done')
  t.same(JSON.parse(done.data), { exit_code: 0, duration_ms: JSON.parse(done.data).duration_ms, timed_out: false, state_lost: false, truncated: false })

  const chunks = events.filter((e) => e.event === 'message').map((e) => JSON.parse(e.data))
  const ids = [...new Set(chunks.map((c) => c.id))]
  t.equal(ids.length, 3, 'stdout, stderr and the trailing value')
  const messages = ids.map((id) => {
    const own = chunks.filter((c) => c.id === id)
    t.ok(own[0].start, 'starts with a boundary')
    t.ok(own.at(-1).end, 'ends with a boundary')
    t.equal(own.filter((c) => c.start || c.end).length, 2)
    for (const c of own) t.match(c, { role: 'computer', type: 'console', format: 'output', created_at: own[0].created_at })
    return { stream: own[0].stream, content: own.map((c) => c.content ?? '').join('') }
  })
  t.same(messages, [
    { stream: 'stdout', content: 'one\n' },
    { stream: 'stderr', content: 'two\n' },
    { stream: 'stdout', content: '42' },
  ])

  const failed = parseSse((await exec('python', '1/0', { stream: true })).res.body)
  t.match(JSON.parse(failed.at(-1)!.data), { exit_code: 1, error: { name: 'ZeroDivisionError' } })
})

t.test('a small timeout_ms stops an infinite loop; the session keeps working', sandboxed, async (t) => {
  const { exec } = await setup(t)
  await exec('python', 'kept = "yes"')
  const { res, body } = await exec('python', 'while True:\n    pass', { timeout_ms: 300 })
  t.equal(res.statusCode, 200)
  t.match(body, { timed_out: true, state_lost: false, error: { name: 'KeyboardInterrupt' } })
  t.match(text(body, 'stderr'), /timed out after 0\.3 s/, 'the request\'s timeout stopped it')
  t.match((await exec('python', 'kept')).body.outputs, [{ content: "'yes'" }], 'interrupted, not killed: state is kept')

  const sh = (await exec('shell', 'while :; do :; done', { timeout_ms: 300 })).body
  t.equal(sh.timed_out, true)
  t.equal(text((await exec('shell', 'echo ok')).body, 'stdout'), 'ok\n')
})

t.test('timeout_ms is capped at EXEC_TIMEOUT_MS; a loop deaf to SIGINT loses its state', sandboxed, async (t) => {
  const { exec } = await setup(t, { EXEC_TIMEOUT_MS: '500', EXEC_GRACE_MS: '300' })
  await exec('python', 'x = 1')
  const { body } = await exec('python', 'import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass', { timeout_ms: 600_000 })
  t.match(body, { timed_out: true, state_lost: true, exit_code: null })
  t.match(text(body, 'stderr'), /timed out after 0\.5 s/, 'capped at EXEC_TIMEOUT_MS')
  t.match(text(body, 'stderr'), /killed/)
  t.match((await exec('python', 'x')).body, { exit_code: 1, error: { name: 'NameError' } }, 'a new kernel, without the old variables')
})

t.test('POST /interrupt stops a running execution', sandboxed, async (t) => {
  const { app, session, exec } = await setup(t)
  const idle = await app.inject({ method: 'POST', url: `/v1/sessions/${session}/interrupt`, headers: auth() })
  t.same(idle.json(), { ok: false, detail: 'Nothing was running' })

  await exec('python', 'before = 1')
  // Interrupt once the code is visibly under way: a SIGINT that lands while the driver is still
  // switching to the cell is lost and the kernel killed after EXEC_GRACE_MS (reported separately).
  const started = join(app.workspaces.dir(session), 'started')
  const running = exec('python', 'import time\nprint("sleeping", flush=True)\nopen("started", "w").close()\ntime.sleep(60)')
  t.ok(await until(() => existsSync(started)), 'the code started')
  const res1 = await app.inject({ method: 'POST', url: `/v1/sessions/${session}/interrupt`, headers: auth() })
  t.same(res1.json(), { ok: true }, 'the interrupt found the execution running')
  const { res, body } = await running
  t.equal(res.statusCode, 200)
  t.match(body, { exit_code: 130, timed_out: false, state_lost: false, error: { name: 'KeyboardInterrupt' } })
  t.equal(text(body, 'stdout'), 'sleeping\n')
  t.match((await exec('python', 'before + 1')).body.outputs, [{ content: '2' }], 'state survives an interrupt')

  rmSync(started)
  const shell = exec('shell', 'touch started; sleep 60')
  t.ok(await until(() => existsSync(started)), 'the shell command started')
  t.same((await app.inject({ method: 'POST', url: `/v1/sessions/${session}/interrupt`, headers: auth() })).json(), { ok: true })
  const sh = (await shell).body
  t.equal(sh.timed_out, false)
  t.not(sh.exit_code, 0, 'the shell stopped too: its sleep did not run to the end')
})

t.test('a client that goes away interrupts its code', sandboxed, async (t) => {
  const { app, session, exec } = await setup(t)
  await exec('python', 'state = "kept"')
  const base = await app.listen({ port: 0, host: '127.0.0.1' })
  for (const stream of [true, false]) {
    // node:http rather than fetch: undici opens a spare connection after an abort, which would hold app.close() for seconds
    const req = request(`${base}/v1/sessions/${session}/execute`, { method: 'POST', headers: { ...auth(), 'content-type': 'application/json' } })
    req.on('error', () => {})
    req.end(JSON.stringify({ language: 'python', code: 'import time\ntime.sleep(60)', stream }))
    await sleep(500)
    req.destroy()
    const next = (await exec('python', 'state')).body
    t.match(next.outputs, [{ content: "'kept'" }], 'interrupted, not killed')
    const events = (await app.inject({ url: `/v1/sessions/${session}/events?reverse=true&limit=10`, headers: auth() })).json().events
    const finished = events.filter((e: { type: string }) => e.type === 'execution_finished')
    t.match(
      finished[1],
      { data: { exit_code: 130, timed_out: false, error: { name: 'KeyboardInterrupt' } } },
      `${stream ? 'stream' : 'JSON'}: the abandoned execution was interrupted, so the next one did not wait for its sleep`,
    )
  }
})

t.test('output past EXEC_OUTPUT_LIMIT_BYTES is cut and says so', sandboxed, async (t) => {
  const { exec } = await setup(t, { EXEC_OUTPUT_LIMIT_BYTES: '4096' })
  const { body } = await exec('python', 'x = 1\nfor _ in range(1000):\n    print("y" * 1000, flush=True)')
  t.match(body, { truncated: true, state_lost: true })
  t.ok(text(body, 'stdout').length <= 4096, `no more than the cap reached the client (${text(body, 'stdout').length})`)
  t.match(text(body, 'stderr'), /was cut/)
  t.match((await exec('python', 'print("fresh")')).body, { exit_code: 0, truncated: false, outputs: [{ content: 'fresh\n' }] })
})

t.test('POST /restart drops the variables', sandboxed, async (t) => {
  const { app, session, exec } = await setup(t)
  await exec('python', 'x = 1')
  await exec('shell', 'export KEEP=shell-state')
  const one = await app.inject({ method: 'POST', url: `/v1/sessions/${session}/restart`, headers: auth(), payload: { language: 'py' } })
  t.same(one.json(), { ok: true })
  t.match((await exec('python', 'x')).body, { exit_code: 1, error: { name: 'NameError', value: "name 'x' is not defined" } })
  t.equal(text((await exec('shell', 'echo $KEEP')).body, 'stdout'), 'shell-state\n', 'only the named language restarted')

  await exec('python', 'y = 2')
  const all = await app.inject({ method: 'POST', url: `/v1/sessions/${session}/restart`, headers: auth() })
  t.same(all.json(), { ok: true }, 'no body restarts every kernel')
  t.match((await exec('python', 'y')).body.error, { name: 'NameError' })
  t.equal(text((await exec('shell', 'echo "[$KEEP]"')).body, 'stdout'), '[]\n')

  const bad = await app.inject({ method: 'POST', url: `/v1/sessions/${session}/restart`, headers: auth(), payload: { language: 'cobol' } })
  t.equal(bad.statusCode, 400)
  t.match(bad.json(), { error: { type: 'validation_error', param: 'language' } })
})

t.test('deleting a session kills its kernel processes and removes its workspace', sandboxed, async (t) => {
  const { app, session, exec } = await setup(t)
  const other = await newSession(app)
  await exec('python', 'import subprocess\nchild = subprocess.Popen(["sleep", "300"])\nopen("/workspace/kept.txt", "w").write("x")')
  await exec('shell', 'sleep 300 &')
  await exec('javascript', '1')
  await execute(app, other, 'python', 'survivor = True')

  const workspace = app.workspaces.dir(session)
  t.ok(existsSync(join(workspace, 'kept.txt')), 'the workspace exists')
  const tree = await kernelTree(session)
  t.ok(tree.length >= 6, `kernel processes found for the session (${tree.length})`)
  const otherTree = await kernelTree(other)
  t.ok(otherTree.length > 0)

  const del = await app.inject({ method: 'DELETE', url: `/v1/sessions/${session}`, headers: auth() })
  t.equal(del.statusCode, 204)
  t.same(await waitGone(tree), [], 'every process of the session, the background children too, is gone')
  t.notOk(existsSync(workspace), 'the workspace directory is removed')
  t.equal((await app.inject({ method: 'POST', url: `/v1/sessions/${session}/execute`, headers: auth(), payload: { language: 'python', code: '1' } })).statusCode, 404)
  t.ok(otherTree.every(isAlive), "another session's kernel is untouched")
  t.match((await execute(app, other, 'python', 'survivor')).body.outputs, [{ content: 'True' }])
})

t.test('GET /v1/languages lists what the host can run', async (t) => {
  const app = await build(t, { SANDBOX: 'none' })
  const res = await app.inject({ url: '/v1/languages', headers: auth() })
  t.equal(res.statusCode, 200)
  const { languages } = res.json() as { languages: { name: string; aliases: string[]; version: string | null; available: boolean }[] }
  t.same(languages.map((l) => l.name).sort(), ['javascript', 'python', 'shell'])
  const by = Object.fromEntries(languages.map((l) => [l.name, l]))
  for (const [name, aliases] of [['python', ['py']], ['shell', ['bash', 'sh']], ['javascript', ['js', 'node']]] as const) {
    t.match(by[name], { available: true, version: /^\d+\.\d+/ }, name)
    for (const alias of aliases) t.ok(by[name]!.aliases.includes(alias), `${name} answers to ${alias}`)
  }
  t.equal(by.javascript!.version, process.versions.node, 'the node version is the one configured')
  t.equal((await app.inject({ url: '/v1/languages' })).statusCode, 401)
})

t.test('SANDBOX=none runs the same API without isolation', async (t) => {
  const app = await build(t, { SANDBOX: 'none' })
  const session = await newSession(app)
  const py = (await execute(app, session, 'python', 'import os\nv = 6 * 7\nprint(os.getcwd() == os.environ["HOME"])\nv')).body
  t.match(py, { exit_code: 0, timed_out: false, state_lost: false, truncated: false })
  t.match(py.outputs, [{ stream: 'stdout', content: 'True\n' }, { content: '42' }])
  t.equal(text((await execute(app, session, 'sh', 'echo $((6 * 7))')).body, 'stdout'), '42\n')
  t.match((await execute(app, session, 'node', 'process.env.API_KEY ?? "scrubbed"')).body.outputs, [{ content: "'scrubbed'" }], "no server environment even without a sandbox")
})

t.test('bad input: unknown language, missing code, bad timeout', async (t) => {
  const app = await build(t, { SANDBOX: 'none' })
  const session = await newSession(app)
  const url = `/v1/sessions/${session}/execute`
  const unknown = await app.inject({ method: 'POST', url, headers: auth(), payload: { language: 'cobol', code: 'DISPLAY 1' } })
  t.equal(unknown.statusCode, 400)
  t.match(unknown.json(), { error: { type: 'validation_error', code: 'invalid_request', param: 'language', message: /cobol/ } })
  for (const payload of [{ language: 'python' }, { language: 'python', code: '1', timeout_ms: 0 }, { code: '1' }, { language: 'python', code: { a: 1 } }]) {
    const res = await app.inject({ method: 'POST', url, headers: auth(), payload })
    t.equal(res.statusCode, 400, JSON.stringify(payload))
    t.match(res.json(), { error: { type: 'validation_error' } })
  }
  const notJson = await app.inject({ method: 'POST', url, headers: { ...auth(), 'content-type': 'application/json' }, payload: '{"language":' })
  t.match(notJson.json(), { error: { code: 'invalid_json' } })
})

t.test('401 without a valid key, 404 for unknown and foreign sessions', async (t) => {
  const app = await build(t, { SANDBOX: 'none' })
  const mine = await newSession(app)
  const { key, record } = newApiKey('other tenant', null)
  await app.store.createApiKey(record)
  const theirs = await newSession(app, key)
  const routes = (id: string) =>
    [
      [`/v1/sessions/${id}/execute`, { language: 'python', code: '1' }],
      [`/v1/sessions/${id}/interrupt`, undefined],
      [`/v1/sessions/${id}/restart`, undefined],
    ] as const

  for (const [url, payload] of routes(mine)) {
    for (const headers of [{}, auth('wrong-key')]) {
      const res = await app.inject({ method: 'POST', url, headers, payload })
      t.equal(res.statusCode, 401, url)
      t.match(res.json(), { error: { type: 'auth_error' } })
    }
  }
  for (const [id, headers, why] of [
    ['00000000-0000-4000-8000-000000000000', auth(), 'unknown'],
    [theirs, auth(), "another tenant's"],
    [mine, auth(key), "the admin's, seen by the other tenant"],
  ] as const) {
    for (const [url, payload] of routes(id)) {
      const res = await app.inject({ method: 'POST', url, headers, payload })
      t.equal(res.statusCode, 404, `${why}: ${url}`)
      t.match(res.json(), { error: { type: 'session_error', code: 'session_not_found' } })
    }
  }
  const own = await app.inject({ method: 'POST', url: `/v1/sessions/${theirs}/execute`, headers: auth(key), payload: { language: 'sh', code: 'echo mine' } })
  t.equal(own.statusCode, 200, 'the owner can run code in it')
  t.match(own.json().outputs, [{ content: 'mine\n' }])
})

t.test('the per-session rate limit answers 429 on the 4th execute; other sessions still work', async (t) => {
  const app = await build(t, { SANDBOX: 'none', SESSION_RATE_LIMIT_PER_MINUTE: '3' })
  const busy = await newSession(app)
  const calm = await newSession(app)
  for (let i = 1; i <= 3; i++) t.equal((await execute(app, busy, 'sh', `echo ${i}`)).res.statusCode, 200, `execute ${i}`)
  const { res } = await execute(app, busy, 'sh', 'echo 4')
  t.equal(res.statusCode, 429)
  t.match(res.json(), { error: { type: 'rate_limit_error', code: 'rate_limit_exceeded', retry_after: Number } })
  const retryAfter = res.json().error.retry_after as number
  t.ok(retryAfter >= 1 && retryAfter <= 60, `retry_after ${retryAfter}`)
  t.equal(res.headers['retry-after'], String(retryAfter))
  t.ok(res.headers['x-request-id'])
  t.ok(res.headers['x-ratelimit-limit'], 'the per-IP headers are on the 429 too')

  const stream = await app.inject({ method: 'POST', url: `/v1/sessions/${busy}/execute`, headers: auth(), payload: { language: 'sh', code: 'echo 5', stream: true } })
  t.equal(stream.statusCode, 429, 'a stream request is refused before the stream opens')
  t.match(stream.headers['content-type'], /^application\/json/)

  const interrupt = await app.inject({ method: 'POST', url: `/v1/sessions/${busy}/interrupt`, headers: auth() })
  t.equal(interrupt.statusCode, 200, 'a limited session can still stop its code')

  const other = await execute(app, calm, 'sh', 'echo calm')
  t.equal(other.res.statusCode, 200, 'another session is not affected')
  t.equal(text(other.body, 'stdout'), 'calm\n')
})

/**
 * Host pids of a session's kernels and everything they started. A kernel's root process starts in
 * the session's workspace, so its working directory, seen from the host, names the session.
 */
async function kernelTree(session: string): Promise<number[]> {
  const roots = (await descendants(process.pid)).filter((pid) => {
    try {
      return readlinkSync(`/proc/${pid}/cwd`).endsWith(`/workspaces/${session}`)
    } catch {
      return false
    }
  })
  const tree = new Set(roots)
  for (const root of roots) for (const pid of await descendants(root)) tree.add(pid)
  return [...tree]
}

function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z'
  } catch {
    return false
  }
}

async function waitGone(pids: number[], timeoutMs = 10_000): Promise<number[]> {
  const deadline = Date.now() + timeoutMs
  let alive = pids.filter(isAlive)
  while (alive.length > 0 && Date.now() < deadline) {
    await sleep(50)
    alive = alive.filter(isAlive)
  }
  return alive
}
