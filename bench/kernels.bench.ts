/**
 * Kernels, measured through the real API on loopback with SANDBOX=bwrap and the rate limits off:
 *   (a) warm round trip of POST /execute `1+1`, sequential, p50/p99
 *   (b) cold start: the first execution in a brand-new session
 *   (c) the same `1+1` through Jupyter's own kernel protocol (jupyter-server + ipykernel from
 *       Debian), execute_request → status idle over its websocket, in the same run
 *   (d) capacity: N live sessions each holding an idle Python kernel (`--sessions=N`, default
 *       100; the target is 500), resident memory per kernel (RSS and PSS from
 *       /proc/PID/smaps_rollup), and every kernel still holding its state afterwards
 * The server runs in its own process (this file again, in the SERVE_ROLE) so the client never
 * shares its event loop, as jupyter-server does not either.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { randomBytes, randomUUID } from 'node:crypto'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { readFile, readlink } from 'node:fs/promises'
import { Agent, request } from 'node:http'
import { createServer } from 'node:net'
import { availableParallelism, loadavg } from 'node:os'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import WebSocket from 'ws'
import { descendants } from '../services/kernels/processes.js'
import { type BenchResult, flag, serve, spawnServer, tempDir } from './lib.js'

const SERVE_ROLE = 'kernels-bench-server'
const API_KEY = 'bench-admin-key'
const CODE = '1+1'
const WARMUP = 50
const WARM_COUNT = 500
const COLD_SESSIONS = 20
/**
 * `--sessions=N` (bench/run.ts passes flags through; the server child gets it as BENCH_SESSIONS
 * for its kernel limits): each idle kernel takes ~15–20 MB of RSS.
 */
const MEMORY_SESSIONS = Number(flag('sessions') ?? process.env.BENCH_SESSIONS ?? 100)
const TARGET_SESSIONS = 500
const MEMORY_CONCURRENCY = 4
const JUPYTER_SERVER = '/usr/bin/jupyter-server'
const JUPYTER_PYTHON = '/usr/bin/python3'
const JUPYTER_START_MS = 60_000
const APT_TIMEOUT_MS = 150_000
const STOP_GRACE_MS = 5000
const TARGETS = { warmP50Ms: 1, ratio: 3, coldP50Ms: 150, mbPerKernel: 15 }

if (process.argv[2] === SERVE_ROLE) await serveRole()

async function serveRole(): Promise<void> {
  const [{ buildApp }, { loadConfig }] = await Promise.all([import('../app.js'), import('../config.js')])
  // Explicit settings, not the caller's environment: the figures must not depend on it.
  const config = loadConfig({
    API_KEY,
    DATA_DIR: required('BENCH_DATA_DIR'),
    SANDBOX: 'bwrap',
    RATE_LIMIT_PER_MINUTE: '0',
    SESSION_RATE_LIMIT_PER_MINUTE: '0',
    MAX_KERNELS: String(MEMORY_SESSIONS + 50),
    // every session is the admin's: the per-key cap would otherwise evict all but 16 kernels
    MAX_KERNELS_PER_TENANT: String(MEMORY_SESSIONS + 50),
    LOG_LEVEL: 'silent',
  })
  await serve(await buildApp(config))
}

if (!Number.isInteger(MEMORY_SESSIONS) || MEMORY_SESSIONS < 1) throw new Error('--sessions must be a positive integer')

function required(name: string): string {
  const value = process.env[name]
  if (value === undefined) throw new Error(`${name} is not set`)
  return value
}

// ---------------------------------------------------------------- figures

/** Nearest-rank percentile of samples in milliseconds. */
function percentile(samples: number[], p: number): number {
  const sorted = [...samples].sort((a, b) => a - b)
  return sorted[Math.max(0, Math.ceil((p / 100) * sorted.length) - 1)]!
}

const fmt = (ms: number) => ms.toFixed(2)
const loadAverage = () => `${loadavg().map((l) => l.toFixed(2)).join(' ')} on ${availableParallelism()} CPUs`
const verdict = (met: boolean) => (met ? 'met' : 'MISSED')

// ---------------------------------------------------------------- our API over loopback HTTP

/** JSON over one keep-alive connection: the overhead of a client library stays out of the figures. */
class Client {
  private readonly agent = new Agent({ keepAlive: true, maxSockets: 1 })
  private readonly url: URL

  constructor(readonly base: string) {
    this.url = new URL(base)
  }

  call(method: string, path: string, body?: unknown): Promise<{ status: number; json: unknown }> {
    const payload = body === undefined ? undefined : JSON.stringify(body)
    return new Promise((resolve, reject) => {
      const req = request(
        {
          agent: this.agent,
          host: this.url.hostname,
          port: this.url.port,
          method,
          path,
          headers: {
            authorization: `Bearer ${API_KEY}`,
            ...(payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }),
          },
        },
        (res) => {
          const chunks: Buffer[] = []
          res.on('data', (c: Buffer) => chunks.push(c))
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8')
            resolve({ status: res.statusCode ?? 0, json: text ? JSON.parse(text) : undefined })
          })
          res.on('error', reject)
        },
      )
      req.on('error', reject)
      req.end(payload)
    })
  }

  async session(): Promise<string> {
    const res = await this.call('POST', '/v1/sessions')
    if (res.status !== 201) throw new Error(`POST /v1/sessions answered ${res.status}: ${JSON.stringify(res.json)}`)
    return (res.json as { session_id: string }).session_id
  }

  /** One `1+1`, checked: a figure for a failed execution would be worthless. */
  async execute(session: string): Promise<void> {
    const res = await this.call('POST', `/v1/sessions/${session}/execute`, { language: 'python', code: CODE })
    const body = res.json as { exit_code?: number; outputs?: { content: string }[] }
    if (res.status !== 200 || body.exit_code !== 0 || body.outputs?.[0]?.content !== '2')
      throw new Error(`execute answered ${res.status}: ${JSON.stringify(res.json).slice(0, 300)}`)
  }

  /** Runs `code` and returns its first output (checked: a failed execution is an error). */
  async output(session: string, code: string): Promise<string> {
    const res = await this.call('POST', `/v1/sessions/${session}/execute`, { language: 'python', code })
    const body = res.json as { exit_code?: number; outputs?: { content: string }[] }
    if (res.status !== 200 || body.exit_code !== 0) throw new Error(`execute answered ${res.status}: ${JSON.stringify(res.json).slice(0, 300)}`)
    return body.outputs?.map((o) => o.content).join('') ?? ''
  }

  close(): void {
    this.agent.destroy()
  }
}

async function timed(action: () => Promise<void>): Promise<number> {
  const started = performance.now()
  await action()
  return performance.now() - started
}

async function warm(client: Client): Promise<number[]> {
  const session = await client.session()
  for (let i = 0; i < WARMUP; i++) await client.execute(session)
  const samples: number[] = []
  for (let i = 0; i < WARM_COUNT; i++) samples.push(await timed(() => client.execute(session)))
  return samples
}

async function cold(client: Client): Promise<number[]> {
  const samples: number[] = []
  for (let i = 0; i < COLD_SESSIONS; i++) {
    const session = await client.session()
    samples.push(await timed(() => client.execute(session)))
    // the next sample must not share the machine with this kernel's teardown
    const res = await client.call('DELETE', `/v1/sessions/${session}`)
    if (res.status !== 204) throw new Error(`DELETE answered ${res.status}`)
  }
  return samples
}

// ---------------------------------------------------------------- resident memory

interface Memory {
  rssKb: number
  pssKb: number
  /** Process names and how many of each a kernel has, e.g. "bwrap ×2, python3.11 ×1". */
  makeup: string
}

async function memoryOf(pid: number): Promise<{ rss: number; pss: number }> {
  try {
    const rollup = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8')
    const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(rollup)?.[1] ?? 0)
    return { rss: field('Rss'), pss: field('Pss') }
  } catch {
    return { rss: 0, pss: 0 }
  }
}

/**
 * Every process of the sessions' kernels. A kernel's root process starts in the session's
 * workspace, so its working directory, seen from the host, names the session; what runs inside
 * the sandbox sees only /workspace.
 */
async function kernelTrees(sessions: Set<string>): Promise<{ sessions: number; pids: number[] }> {
  const roots: number[] = []
  const found = new Set<string>()
  for (const pid of await descendants(process.pid)) {
    const cwd = await readlink(`/proc/${pid}/cwd`).catch(() => '')
    const match = /\/workspaces\/([^/]+)$/.exec(cwd)
    if (!match || !sessions.has(match[1]!)) continue
    roots.push(pid)
    found.add(match[1]!)
  }
  // one scan of /proc at a time: each opens every /proc/N/stat, and a hundred at once run out of
  // descriptors, which descendants() does not report (processes just go missing)
  const pids = new Set<number>()
  for (const root of roots) for (const pid of [root, ...(await descendants(root))]) pids.add(pid)
  return { sessions: found.size, pids: [...pids] }
}

/** Runs `each(session, index)` over every session, MEMORY_CONCURRENCY at a time. */
async function lanes(client: Client, sessions: string[], each: (c: Client, session: string, index: number) => Promise<void>): Promise<void> {
  // a few at a time: kernel start-up is CPU-bound, a larger burst only queues
  const clients = Array.from({ length: MEMORY_CONCURRENCY }, () => new Client(client.base))
  try {
    await Promise.all(
      clients.map(async (c, lane) => {
        for (let i = lane; i < sessions.length; i += MEMORY_CONCURRENCY) await each(c, sessions[i]!, i)
      }),
    )
  } finally {
    for (const c of clients) c.close()
  }
}

async function memory(client: Client): Promise<{ perKernel: Memory; kernels: number; startSeconds: number }> {
  const sessions: string[] = []
  for (let i = 0; i < MEMORY_SESSIONS; i++) sessions.push(await client.session())
  const started = performance.now()
  await lanes(client, sessions, async (c, session, i) => {
    const echoed = await c.output(session, `n = ${i}\nn`)
    if (echoed !== String(i)) throw new Error(`session ${i} answered ${JSON.stringify(echoed)}`)
  })
  const startSeconds = (performance.now() - started) / 1000
  await new Promise((resolve) => setTimeout(resolve, 1000))
  const { sessions: roots, pids } = await kernelTrees(new Set(sessions))
  if (roots !== sessions.length) throw new Error(`found the kernels of ${roots} sessions out of ${sessions.length}`)
  const names = await Promise.all(pids.map((pid) => readFile(`/proc/${pid}/comm`, 'utf8').then((n) => n.trim(), () => '?')))
  const counts = new Map<string, number>()
  for (const name of names) counts.set(name, (counts.get(name) ?? 0) + 1)
  const pythons = names.filter((n) => n.startsWith('python')).length
  // a tree that lost its interpreter would make the figure look better than it is
  if (pythons !== sessions.length) throw new Error(`found ${pythons} Python processes for ${sessions.length} kernels`)
  const makeup = [...counts].map(([name, n]) => `${name} ×${Number((n / roots).toFixed(2))}`).join(', ')
  const figures = await Promise.all(pids.map(memoryOf))
  const total = figures.reduce((sum, m) => ({ rss: sum.rss + m.rss, pss: sum.pss + m.pss }), { rss: 0, pss: 0 })
  // every kernel is still the one that started: none was evicted, restarted or lost its state
  await lanes(client, sessions, async (c, session, i) => {
    const kept = await c.output(session, 'n')
    if (kept !== String(i)) throw new Error(`session ${i} lost its kernel state: ${JSON.stringify(kept.slice(0, 300))}`)
  })
  return { kernels: roots, startSeconds, perKernel: { rssKb: total.rss / roots, pssKb: total.pss / roots, makeup } }
}

// ---------------------------------------------------------------- Jupyter

function run(command: string, args: string[], timeoutMs: number): Promise<{ ok: boolean; output: string }> {
  return new Promise((resolve) => {
    execFile(command, args, { timeout: timeoutMs, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } }, (err, stdout, stderr) => {
      resolve({ ok: !err, output: `${stdout}${stderr}`.trim() || (err?.message ?? '') })
    })
  })
}

const jupyterPresent = async () => existsSync(JUPYTER_SERVER) && (await run(JUPYTER_PYTHON, ['-c', 'import ipykernel'], 30_000)).ok

/** Jupyter from Debian packages, installed if missing; the reason when that is not possible. */
async function ensureJupyter(): Promise<string | undefined> {
  if (await jupyterPresent()) return undefined
  if (process.getuid?.() !== 0 || !existsSync('/usr/bin/apt-get')) return `${JUPYTER_SERVER} or ipykernel is missing and apt-get cannot run here (needs root on Debian)`
  console.log('installing jupyter-server and python3-ipykernel from Debian …')
  const install = await run('/usr/bin/apt-get', ['install', '-y', '--no-install-recommends', 'jupyter-server', 'python3-ipykernel'], APT_TIMEOUT_MS)
  if (!install.ok) return `apt-get install jupyter-server python3-ipykernel failed: ${install.output.split('\n').slice(-3).join(' | ')}`
  return (await jupyterPresent()) ? undefined : 'jupyter-server or ipykernel still missing after apt-get install'
}

async function freePort(): Promise<number> {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as { port: number }
  server.close()
  return port
}

/** A process as it was seen: pid plus start time, so a recycled pid is never mistaken for it. */
interface Seen {
  pid: number
  start: string
}

async function startTime(pid: number): Promise<string | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
  // fields after the parenthesized command name; the start time is the 20th of them
  return stat?.slice(stat.lastIndexOf(')') + 2).split(' ')[19]
}

async function processes(pids: number[]): Promise<Seen[]> {
  const seen = await Promise.all(pids.map(async (pid) => ({ pid, start: await startTime(pid) })))
  return seen.filter((p): p is Seen => p.start !== undefined)
}

async function stillRunning(seen: Seen[]): Promise<Seen[]> {
  const alive = await Promise.all(seen.map(async (p) => ((await startTime(p.pid)) === p.start ? p : undefined)))
  return alive.filter((p): p is Seen => p !== undefined)
}

function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name)
  } catch {
    // already gone
  }
}

interface Jupyter {
  base: string
  token: string
  stop(): Promise<void>
}

async function startJupyter(): Promise<Jupyter> {
  const dir = tempDir('oi-bench-jupyter-')
  const port = await freePort()
  const token = randomBytes(24).toString('hex')
  const child: ChildProcess = spawn(
    JUPYTER_SERVER,
    [
      '--no-browser',
      '--ip=127.0.0.1',
      `--port=${port}`,
      '--port-retries=0',
      `--ServerApp.token=${token}`,
      `--ServerApp.root_dir=${dir}`,
      '--ServerApp.allow_root=True',
      '--ServerApp.log_level=WARN',
    ],
    {
      // its own process group, so the kernels it starts go down with it
      detached: true,
      stdio: ['ignore', 'ignore', 'pipe'],
      env: {
        PATH: process.env.PATH ?? '/usr/bin:/bin',
        HOME: dir,
        JUPYTER_CONFIG_DIR: join(dir, 'config'),
        JUPYTER_RUNTIME_DIR: join(dir, 'runtime'),
        IPYTHONDIR: join(dir, 'ipython'),
        PYDEVD_DISABLE_FILE_VALIDATION: '1',
      },
    },
  )
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => {
    if (stderr.length < 8192) stderr += d.toString('utf8')
  })
  const exited = once(child, 'exit')
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return
    const kernels = await processes(await descendants(child.pid!))
    signal(-child.pid!, 'SIGTERM')
    const timer = setTimeout(() => signal(-child.pid!, 'SIGKILL'), STOP_GRACE_MS)
    await exited
    clearTimeout(timer)
    // Kernels run in sessions of their own and leave by themselves once jupyter-server is gone
    // (JPY_PARENT_PID); one still there after the grace period is killed if it is the same process.
    const deadline = Date.now() + STOP_GRACE_MS
    for (let left = await stillRunning(kernels); left.length > 0; left = await stillRunning(left)) {
      if (Date.now() > deadline) {
        for (const p of left) signal(p.pid, 'SIGKILL')
        break
      }
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  const base = `http://127.0.0.1:${port}`
  const deadline = Date.now() + JUPYTER_START_MS
  for (;;) {
    if (child.exitCode !== null) throw new Error(`jupyter-server exited with ${child.exitCode}: ${stderr.trim().slice(-500)}`)
    const ok = await fetch(`${base}/api/status`, { headers: { authorization: `token ${token}` } }).then(
      (r) => r.ok,
      () => false,
    )
    if (ok) return { base, token, stop }
    if (Date.now() > deadline) {
      await stop()
      throw new Error(`jupyter-server did not answer within ${JUPYTER_START_MS} ms: ${stderr.trim().slice(-500)}`)
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

interface JupyterMessage {
  header: { msg_id: string; msg_type: string }
  parent_header: { msg_id?: string }
  channel: string
  content: Record<string, unknown>
}

/** A client of the kernel's channels websocket speaking messaging protocol v5 as JSON frames. */
class KernelChannel {
  private readonly session = randomUUID()
  private waiting: { id: string; done: (m: JupyterMessage) => boolean; resolve: () => void; reject: (e: Error) => void } | undefined

  private constructor(private readonly socket: WebSocket) {
    socket.on('message', (data) => {
      const message = JSON.parse(data.toString()) as JupyterMessage
      const w = this.waiting
      if (w && message.parent_header?.msg_id === w.id && w.done(message)) {
        this.waiting = undefined
        w.resolve()
      }
    })
    socket.on('close', () => this.waiting?.reject(new Error('the kernel websocket closed')))
  }

  static async open(jupyter: Jupyter, kernelId: string): Promise<KernelChannel> {
    const socket = new WebSocket(`${jupyter.base.replace('http', 'ws')}/api/kernels/${kernelId}/channels?session_id=${randomUUID()}`, {
      headers: { authorization: `token ${jupyter.token}` },
    })
    await once(socket, 'open')
    return new KernelChannel(socket)
  }

  private send(channel: string, type: string, content: object, done: (m: JupyterMessage) => boolean): Promise<void> {
    const id = randomUUID()
    const message = {
      header: { msg_id: id, msg_type: type, username: 'bench', session: this.session, date: new Date().toISOString(), version: '5.3' },
      parent_header: {},
      metadata: {},
      content,
      channel,
      buffers: [],
    }
    return new Promise((resolve, reject) => {
      this.waiting = { id, done, resolve, reject }
      this.socket.send(JSON.stringify(message))
    })
  }

  /** Resolves on kernel_info_reply: the kernel is up and answering. */
  info(): Promise<void> {
    return this.send('shell', 'kernel_info_request', {}, (m) => m.header.msg_type === 'kernel_info_reply')
  }

  /** Resolves when the kernel reports idle for this request: its output has all been published. */
  execute(code: string): Promise<void> {
    return this.send(
      'shell',
      'execute_request',
      { code, silent: false, store_history: true, user_expressions: {}, allow_stdin: false, stop_on_error: true },
      (m) => m.header.msg_type === 'status' && m.content.execution_state === 'idle',
    )
  }

  close(): void {
    this.socket.close()
  }
}

/**
 * The same kernel driven over ZeroMQ by jupyter_client, without jupyter-server in between: the
 * floor of Jupyter's protocol, printed for reference next to the websocket figure.
 */
const ZMQ_CLIENT = `
import json, sys, time
from jupyter_client.manager import start_new_kernel
warmup, count, code = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
km, kc = start_new_kernel(kernel_name="python3")
def once():
    started = time.perf_counter()
    msg_id = kc.execute(code)
    while True:
        m = kc.get_iopub_msg(timeout=30)
        if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
    elapsed = (time.perf_counter() - started) * 1000
    kc.get_shell_msg(timeout=30)
    return elapsed
try:
    for _ in range(warmup):
        once()
    print(json.dumps([once() for _ in range(count)]))
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
`

async function jupyterZmqRoundTrips(): Promise<number[]> {
  const dir = tempDir('oi-bench-jupyter-zmq-')
  return new Promise((resolve, reject) => {
    execFile(
      JUPYTER_PYTHON,
      ['-c', ZMQ_CLIENT, String(WARMUP), String(WARM_COUNT), CODE],
      { timeout: JUPYTER_START_MS, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir, JUPYTER_RUNTIME_DIR: dir, IPYTHONDIR: join(dir, 'ipython'), PYDEVD_DISABLE_FILE_VALIDATION: '1' } },
      (err, stdout, stderr) => {
        if (err) reject(new Error(`jupyter_client over ZeroMQ failed: ${(stderr || err.message).trim().slice(-300)}`))
        else resolve(JSON.parse(stdout.trim().split('\n').at(-1)!) as number[])
      },
    )
  })
}

async function jupyterRoundTrips(): Promise<number[]> {
  const jupyter = await startJupyter()
  try {
    const auth = { authorization: `token ${jupyter.token}`, 'content-type': 'application/json' }
    const created = await fetch(`${jupyter.base}/api/kernels`, { method: 'POST', headers: auth, body: JSON.stringify({ name: 'python3' }) })
    if (!created.ok) throw new Error(`POST /api/kernels answered ${created.status}: ${await created.text()}`)
    const { id } = (await created.json()) as { id: string }
    const channel = await KernelChannel.open(jupyter, id)
    try {
      const deadline = Date.now() + JUPYTER_START_MS
      // the kernel may still be starting: its first kernel_info_request can go unanswered
      for (let ready = false; !ready; ) {
        ready = await Promise.race([channel.info().then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 1000))])
        if (!ready && Date.now() > deadline) throw new Error('the Jupyter kernel never answered kernel_info_request')
      }
      for (let i = 0; i < WARMUP; i++) await channel.execute(CODE)
      const samples: number[] = []
      for (let i = 0; i < WARM_COUNT; i++) samples.push(await timed(() => channel.execute(CODE)))
      return samples
    } finally {
      channel.close()
      await fetch(`${jupyter.base}/api/kernels/${id}`, { method: 'DELETE', headers: auth }).catch(() => {})
    }
  } finally {
    await jupyter.stop()
  }
}

// ---------------------------------------------------------------- the benchmark

export default async function kernels(): Promise<BenchResult> {
  const dir = tempDir()
  const server = await spawnServer(new URL(import.meta.url), [SERVE_ROLE], { BENCH_DATA_DIR: join(dir, 'data'), BENCH_SESSIONS: String(MEMORY_SESSIONS) })
  const client = new Client(server.url)
  const lines: string[] = []
  const met: boolean[] = []
  try {
    console.log(`server: buildApp with SANDBOX=bwrap, rate limits off, logging off, SQLite, in its own process at ${server.url}`)
    console.log(`code:   python ${JSON.stringify(CODE)}; ${WARMUP} warm-up runs are discarded before each warm series of ${WARM_COUNT}`)
    // latency figures on a shared host mean little without the load they were taken under
    console.log(`load:   ${loadAverage()} at the start\n`)

    const ours = await warm(client).catch(async (err: Error) => {
      const ready = await fetch(`${server.url}/v1/health/ready`).then((r) => r.text())
      throw new Error(`${err.message}; readiness: ${ready}`)
    })
    const oursP50 = percentile(ours, 50)
    lines.push(`(a) warm POST /execute over HTTP: p50 ${fmt(oursP50)} ms, p99 ${fmt(percentile(ours, 99))} ms (n=${ours.length}; target p50 ≤ ${TARGETS.warmP50Ms} ms: ${verdict(oursP50 <= TARGETS.warmP50Ms)})`)
    met.push(oursP50 <= TARGETS.warmP50Ms)
    console.log(lines.at(-1))

    const skipped = await ensureJupyter()
    if (skipped) {
      lines.push(`(c) Jupyter skipped: ${skipped}`)
      console.log(lines.at(-1))
    } else {
      const theirs = await jupyterRoundTrips()
      const theirsP50 = percentile(theirs, 50)
      const ratio = theirsP50 / oursP50
      lines.push(`(c) Jupyter execute_request → idle over its websocket: p50 ${fmt(theirsP50)} ms, p99 ${fmt(percentile(theirs, 99))} ms (n=${theirs.length})`)
      console.log(lines.at(-1))
      lines.push(`    ratio Jupyter/ours at p50: ${ratio.toFixed(2)}×, at p99: ${(percentile(theirs, 99) / percentile(ours, 99)).toFixed(2)}× (target ≥ ${TARGETS.ratio}× at p50: ${verdict(ratio >= TARGETS.ratio)})`)
      met.push(ratio >= TARGETS.ratio)
      console.log(lines.at(-1))
      // jupyter-server leaves Nagle's algorithm on for its websockets (tornado's default), so
      // each burst of small messages can wait for a delayed ACK: the ZeroMQ figure shows the rest.
      const zmq = await jupyterZmqRoundTrips()
      lines.push(`    reference, the same kernel over ZeroMQ with jupyter_client (no jupyter-server): p50 ${fmt(percentile(zmq, 50))} ms, p99 ${fmt(percentile(zmq, 99))} ms (n=${zmq.length}; ratio to ours at p50 ${(percentile(zmq, 50) / oursP50).toFixed(2)}×)`)
      console.log(lines.at(-1))
    }

    const starts = await cold(client)
    const coldP50 = percentile(starts, 50)
    lines.push(`(b) cold first execution in a new session: p50 ${fmt(coldP50)} ms, max ${fmt(Math.max(...starts))} ms (n=${starts.length}; target p50 ≤ ${TARGETS.coldP50Ms} ms: ${verdict(coldP50 <= TARGETS.coldP50Ms)})`)
    met.push(coldP50 <= TARGETS.coldP50Ms)
    console.log(lines.at(-1))

    const { perKernel, kernels, startSeconds } = await memory(client)
    const mb = perKernel.rssKb / 1024
    const pss = perKernel.pssKb / 1024
    lines.push(
      `(d) ${kernels} live sessions, each with an idle Python kernel that kept its state (target ≥ ${TARGET_SESSIONS} sessions, this run --sessions=${MEMORY_SESSIONS}): ` +
        `${mb.toFixed(1)} MB RSS, ${pss.toFixed(1)} MB PSS per kernel (processes: ${perKernel.makeup}; all ${kernels} started in ${startSeconds.toFixed(1)} s, ${MEMORY_CONCURRENCY} at a time; ` +
        `target ≤ ${TARGETS.mbPerKernel} MB PSS: ${verdict(pss <= TARGETS.mbPerKernel)})`,
    )
    met.push(pss <= TARGETS.mbPerKernel)
    console.log(lines.at(-1))
    lines.push(`load average ${loadAverage()} at the end`)
    console.log(lines.at(-1))
  } finally {
    client.close()
    await server.stop()
  }
  return { summary: lines.map((l) => l.trim()).join('\n  '), met: met.every(Boolean) }
}
