import { monitorEventLoopDelay } from 'node:perf_hooks'
import { buildApp } from '../app.js'
import { loadConfig } from '../config.js'
import { serve } from './lib.js'
import Sqlite from 'better-sqlite3'
const slow: string[] = []
const sqlSpans = new Map<string, number[]>()
const proto = (Sqlite as any).prototype
const origPrepare = proto.prepare
proto.prepare = function (sql: string, ...rest: unknown[]) {
  const st = origPrepare.call(this, sql, ...rest)
  for (const m of ['run', 'all', 'get']) {
    const o = st[m].bind(st)
    st[m] = (...a: unknown[]) => { const t = performance.now(); try { return o(...a) } finally { const d = performance.now() - t; const k = sql.slice(0, 40); let arr = sqlSpans.get(k); if (!arr) sqlSpans.set(k, (arr = [])); arr.push(d); if (d > 5) slow.push(`${d.toFixed(1)}ms ${k}`) } }
  }
  return st
}
const config = loadConfig({ API_KEY: 'bench-admin-key', DATA_DIR: process.env.BENCH_DATA_DIR, LLM_BASE_URL: process.env.BENCH_UPSTREAM, LLM_API_KEY: 'x', MODELS: 'fake-model', SANDBOX: 'none', RATE_LIMIT_PER_MINUTE: '0', SESSION_RATE_LIMIT_PER_MINUTE: '0' })
const app = await buildApp(config)
const spans = new Map<string, number[]>()
const rec = (k: string, v: number) => { let a = spans.get(k); if (!a) spans.set(k, (a = [])); a.push(v) }
const store = app.store as any
for (const name of ['createSession','getSession','getSettings','listSecrets','appendMessage','appendEvent','allMessages']) {
  const orig = store[name].bind(store)
  store[name] = async (...args: unknown[]) => { const t = performance.now(); try { return await orig(...args) } finally { rec(name, performance.now() - t) } }
}
app.addHook('onRequest', async (req) => { (req as any)._t = performance.now() })
app.addHook('onResponse', async (req) => { rec('request', performance.now() - (req as any)._t) })
const h = monitorEventLoopDelay({ resolution: 1 }); h.enable()
process.on('SIGTERM', () => {
  const out: string[] = []
  for (const [k, a] of spans) { a.sort((x, y) => x - y); out.push(`${k.padEnd(14)} n=${a.length} p50=${a[Math.floor(a.length/2)]!.toFixed(3)} p99=${a[Math.floor(a.length*0.99)]!.toFixed(3)} max=${a.at(-1)!.toFixed(1)}`) }
  out.push(`eventloop delay p50=${(h.percentile(50)/1e6).toFixed(2)} p99=${(h.percentile(99)/1e6).toFixed(2)} max=${(h.max/1e6).toFixed(1)}`)
  for (const [k, a] of sqlSpans) { if (a.length < 50) continue; a.sort((x, y) => x - y); out.push(`sql ${k.padEnd(40)} n=${a.length} p50=${a[Math.floor(a.length/2)]!.toFixed(3)} p99=${a[Math.floor(a.length*0.99)]!.toFixed(3)} max=${a.at(-1)!.toFixed(1)} sum=${a.reduce((x,y)=>x+y,0).toFixed(0)}`) }
  out.push(`slow: ${slow.length}`, ...slow.slice(0, 15))
  console.error(out.join('\n'))
})
await serve(app)
