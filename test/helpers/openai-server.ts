import { startFakeUpstream, type FakeUpstream } from '../fakes/upstream.js'
import { ADMIN_KEY, build, type FastifyInstance, type Tap } from './build.js'

export interface ListeningServer {
  app: FastifyInstance
  upstream: FakeUpstream
  /** The server's `/v1` base URL on loopback, as OpenAI clients take it. */
  baseURL: string
  apiKey: string
  /** The upstream calls made so far: one per step of the agent. */
  chatCalls(): number
  /** The number of sessions the admin tenant has. */
  sessionCount(): Promise<number>
}

/**
 * The server listening on loopback (no sandbox: these tests are about the wire, not isolation)
 * over the scripted fake upstream, both closed when the test ends. Client libraries are pointed
 * at `baseURL` unmodified.
 */
export async function listeningServer(t: Tap, env: Record<string, string> = {}): Promise<ListeningServer> {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none', ...env })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  return {
    app,
    upstream,
    baseURL: `http://127.0.0.1:${port}/v1`,
    apiKey: ADMIN_KEY,
    chatCalls: () => upstream.requests.filter((r) => r.path.endsWith('/chat/completions')).length,
    sessionCount: async () => (await app.inject({ url: '/v1/sessions?limit=100', headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json().sessions.length,
  }
}
