import { fork } from 'node:child_process'
import { once } from 'node:events'
import autocannon from 'autocannon'
import { spawnServer, tempDir } from './lib.js'
const SELF = new URL('./openai.bench.ts', import.meta.url)
const dir = tempDir()
const upstream = await spawnServer(SELF, ['upstream'])
const extra = process.env.TRACE_GC ? ['--trace-gc'] : process.env.PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.PROF}`] : []
const child = fork(new URL('./_probe_server.ts', import.meta.url), [], { execArgv: ['--import', 'tsx', ...extra], env: { ...process.env, BENCH_DATA_DIR: dir, BENCH_UPSTREAM: upstream.url }, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
const [msg] = (await once(child, 'message')) as [{ url: string }]
const headers = { authorization: 'Bearer bench-admin-key', 'content-type': 'application/json' }
const body = JSON.stringify({ model: 'fake-model', messages: [{ role: 'user', content: 'Say ok.' }], ...(process.env.STREAM ? { stream: true } : {}) })
for (const c of (process.env.CONNS ?? '1,2,5,20').split(',').map(Number)) {
  const r = await autocannon({ url: `${msg.url}/v1/chat/completions`, method: 'POST', headers, body, connections: c, duration: Number(process.env.DUR ?? 3) })
  console.log(c, 'conns', Math.round(r.requests.average), 'rps', 'lat p50', r.latency.p50, 'p99', r.latency.p99, 'max', r.latency.max, 'non2xx', r.non2xx, 'errors', r.errors)
}
const exited = once(child, 'exit'); child.kill('SIGTERM'); await exited
await upstream.stop()
