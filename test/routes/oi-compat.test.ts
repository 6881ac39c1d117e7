import { spawn, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { startFakeUpstream, text, toolCall } from '../fakes/upstream.js'
import { ADMIN_KEY, build } from '../helpers/build.js'

const PYTHON = '/usr/bin/python3'
const CLIENT = fileURLToPath(new URL('./oi-compat-client.py', import.meta.url))

/** Runs the Python client to its end; resolves with its exit code and output. */
function runClient(env: Record<string, string>): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn('setpriv', ['--pdeathsig', 'SIGKILL', '--', PYTHON, CLIENT], { env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

const hasPythonClients = () => existsSync(PYTHON) && spawnSync(PYTHON, ['-c', 'import websockets, requests']).status === 0

const noPythonClients = hasPythonClients() ? false : 'needs /usr/bin/python3 with python3-websockets and python3-requests'

t.test("Open Interpreter's test_server flow, driven by a Python client on OI_COMPAT_PORT", { skip: noPythonClients }, async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const main = await app.listen({ host: '127.0.0.1', port: 0 })
  const port = await app.listenOiCompat({ host: '127.0.0.1', port: 0 })
  const poem = 'Rain on the Sound, ferries hum low, cedar and coffee, the mountain aglow; gray skies above and the markets below.'
  upstream.script(
    text("The secret word is 'crunk'."),
    text("The secret word is 'barloney'."),
    toolCall({ language: 'python', code: 'print(239023*79043)' }),
    text('239023 times 79043 is 18893094989.'),
    text(poem, { pieces: 30, chunkMs: 20 }),
  )
  const run = await runClient({ OI_PORT: String(port), MAIN_URL: main, OI_KEY: ADMIN_KEY, POEM: poem })
  t.equal(run.code, 0, run.stderr)
  const steps = Object.fromEntries(
    run.stdout
      .trim()
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        const step = JSON.parse(line)
        return [step.step, step]
      }),
  )
  t.same(Object.keys(steps), ['plain', 'reset', 'awaiting', 'go', 'nothing-to-go', 'reconnect', 'wrong-key'])

  // The history posted to /settings is what the model saw, and the reset replaced it.
  const said = (i: number) => JSON.stringify(upstream.requests[i]?.body.messages)
  t.match(said(0), /crunk/)
  t.notMatch(said(1), /crunk/)
  t.match(said(1), /barloney/)
  t.notMatch(said(2), /barloney/, 'messages: [] reset the conversation')

  // Upstream's framing: code block, then approval waits with complete; go runs it, console block with active_line null.
  t.same(steps.awaiting.frames, [
    { role: 'assistant', type: 'code', format: 'python', start: true },
    ...steps.awaiting.frames.slice(1, -2),
    { role: 'assistant', type: 'code', format: 'python', end: true },
    { role: 'server', type: 'status', content: 'complete' },
  ])
  t.equal(steps.awaiting.frames.slice(1, -2).map((f: { content: string }) => f.content).join(''), 'print(239023*79043)')
  t.same(steps.go.frames.slice(0, 4), [
    { role: 'computer', type: 'console', start: true },
    { role: 'computer', type: 'console', format: 'output', content: '18893094989\n' },
    { role: 'computer', type: 'console', format: 'active_line', content: null },
    { role: 'computer', type: 'console', end: true },
  ])
  t.same(steps.go.frames.at(-1), { role: 'server', type: 'status', content: 'complete' })
  t.equal(steps['nothing-to-go'].error.content, 'No turn in this session is waiting for a confirmation')

  // The answer was cut after four acknowledged frames; the next socket got exactly the rest.
  t.ok(steps.reconnect.first.length > 0 && steps.reconnect.rest.length > 0)
  t.equal(steps.reconnect.first + steps.reconnect.rest, poem)
  t.equal(steps['wrong-key'].status, 401)
})
