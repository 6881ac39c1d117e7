import autocannon from 'autocannon'
import { startFakeUpstream } from './test/fakes/upstream.js'
const up = await startFakeUpstream({ record: false })
for (const stream of [false, true]) {
  const r = await autocannon({ url: `${up.url}/chat/completions`, method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'm', stream, stream_options: { include_usage: true }, messages: [{ role: 'user', content: 'hi' }] }), duration: 3, connections: 10 })
  console.log({ stream, rps: r.requests.average, p50: r.latency.p50, p99: r.latency.p99, errors: r.errors, non2xx: r.non2xx })
}
await up.close()
