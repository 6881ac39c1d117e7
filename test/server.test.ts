import { execFileSync } from 'node:child_process'
import { readFileSync, rmSync, statSync } from 'node:fs'
import { request } from 'node:https'
import { join } from 'node:path'
import t from 'tap'
import { tempDir } from './helpers/build.js'
import { startServer } from './helpers/server-process.js'

t.test('starts with a banner, answers health, exits 0 on SIGTERM', async (t) => {
  const dataDir = tempDir(t)
  const server = await startServer({ DATA_DIR: dataDir })
  t.teardown(() => server.stop('SIGKILL'))
  t.match(server.stderr(), /docs: +http:\/\/127\.0\.0\.1:\d+\/docs/)
  t.match(server.stderr(), /storage: +SQLite/)
  t.match(server.stderr(), /sandbox: +none/)
  const key = /API key: +(\S+)/.exec(server.stderr())?.[1]
  t.ok(key, 'a generated admin key is printed once')
  const health = await fetch(`${server.url}/v1/health`)
  t.equal(health.status, 200)
  const metrics = await fetch(`${server.url}/metrics`, { headers: { authorization: `Bearer ${key}` } })
  t.equal(metrics.status, 200, 'the printed key works')
  t.equal(await server.stop('SIGTERM'), 0)
  t.notMatch(server.stdout(), new RegExp(key!), 'the generated key is never logged')
  t.equal(server.stderr().split(key!).length, 2, 'it is printed once, in the banner')
  for (const line of server.stdout().trim().split('\n')) t.doesNotThrow(() => JSON.parse(line), `stdout is JSON lines only: ${line}`)
})

t.test('the generated admin key is kept in DATA_DIR and reused after a restart', async (t) => {
  const dataDir = tempDir(t)
  const file = join(dataDir, 'admin.key')
  const first = await startServer({ DATA_DIR: dataDir })
  t.teardown(() => first.stop('SIGKILL'))
  const key = /API key: +(oia_\S+)/.exec(first.stderr())?.[1]
  t.ok(key, 'the first start shows the key it made')
  t.match(first.stderr(), `kept in ${file} (mode 0600)`)
  t.match(first.stderr(), /to rotate it, delete that file and restart, or set API_KEY/)
  t.equal(statSync(file).mode & 0o777, 0o600)
  t.equal(readFileSync(file, 'utf8').trim(), key)
  t.equal(await first.stop('SIGTERM'), 0)

  const second = await startServer({ DATA_DIR: dataDir })
  t.teardown(() => second.stop('SIGKILL'))
  t.notMatch(second.stderr(), key!, 'a restart does not print the key again')
  t.match(second.stderr(), `API key:   the one kept in ${file}`)
  const metrics = await fetch(`${second.url}/metrics`, { headers: { authorization: `Bearer ${key}` } })
  t.equal(metrics.status, 200, 'the key from the first start still works')
  t.equal(await second.stop('SIGTERM'), 0)

  rmSync(file)
  const rotated = await startServer({ DATA_DIR: dataDir })
  t.teardown(() => rotated.stop('SIGKILL'))
  const fresh = /API key: +(oia_\S+)/.exec(rotated.stderr())?.[1]
  t.ok(fresh && fresh !== key, 'deleting the file rotates the key')
  const old = await fetch(`${rotated.url}/metrics`, { headers: { authorization: `Bearer ${key}` } })
  t.equal(old.status, 401, 'the old key no longer works')
})

t.test('in-flight requests finish during graceful shutdown', async (t) => {
  const server = await startServer({ DATA_DIR: tempDir(t), API_KEY: 'k', LOG_LEVEL: 'info' })
  t.teardown(() => server.stop('SIGKILL'))
  const inflight = fetch(`${server.url}/v1/health/ready`)
  const exit = server.stop('SIGINT')
  const res = await inflight.catch(() => null)
  t.ok(res === null || res.status === 200 || res.status === 503)
  t.equal(await exit, 0)
  t.match(server.stdout(), /shutting down/)
})

t.test('HTTPS with TLS_CERT_FILE and TLS_KEY_FILE, with HSTS', async (t) => {
  const dir = tempDir(t)
  const cert = join(dir, 'cert.pem')
  const key = join(dir, 'key.pem')
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', key, '-out', cert,
  ], { stdio: 'ignore' })
  const server = await startServer({ DATA_DIR: join(dir, 'data'), API_KEY: 'k', TLS_CERT_FILE: cert, TLS_KEY_FILE: key })
  t.teardown(() => server.stop('SIGKILL'))
  t.match(server.url, /^https:\/\//)
  const { status, headers, body } = await new Promise<{ status?: number; headers: Record<string, unknown>; body: string }>((resolve, reject) => {
    const req = request(`${server.url}/v1/health`, { ca: readFileSync(cert) }, (res) => {
      let body = ''
      res.on('data', (d) => (body += d))
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }))
    })
    req.on('error', reject)
    req.end()
  })
  t.equal(status, 200)
  t.match(JSON.parse(body), { status: 'healthy' })
  t.match(headers['strict-transport-security'], /max-age=\d+/)
  t.equal(await server.stop(), 0)
})

t.test('a body over BODY_LIMIT gets a readable 413 while fetch is still sending it', async (t) => {
  // A separate process, as in production: in one process the client reads the answer before
  // the server's close reaches it, and the failure this guards against does not show.
  const server = await startServer({ DATA_DIR: tempDir(t), API_KEY: 'k', BODY_LIMIT: '1024', RATE_LIMIT_PER_MINUTE: '0' })
  t.teardown(() => server.stop('SIGKILL'))
  const body = Buffer.alloc(60 * 1024 * 1024, 'x')
  const chunks = () =>
    new ReadableStream({
      start(controller) {
        for (let i = 0; i < body.length; i += 1024 * 1024) controller.enqueue(body.subarray(i, i + 1024 * 1024))
        controller.close()
      },
    })
  const outcomes: string[] = []
  for (let i = 0; i < 6; i++) {
    for (const [name, init] of [
      ['buffer', { body }],
      ['stream', { body: chunks(), duplex: 'half' }],
      ['no key', { body, anonymous: true }],
    ] as const) {
      const headers: Record<string, string> = { 'content-type': 'application/json' }
      if (!('anonymous' in init)) headers.authorization = 'Bearer k'
      try {
        const res = await fetch(`${server.url}/v1/sessions`, { method: 'POST', headers, ...init } as RequestInit)
        const text = await res.text()
        outcomes.push(`${name} ${res.status} ${res.headers.get('connection')} ${JSON.parse(text).error?.code}`)
      } catch (err) {
        outcomes.push(`${name} ${(err as { cause?: { code?: string } }).cause?.code ?? (err as Error).message}`)
      }
    }
  }
  t.same(
    outcomes,
    Array.from({ length: 6 }, () => ['buffer 413 close payload_too_large', 'stream 413 close payload_too_large', 'no key 401 close missing_api_key']).flat(),
  )
  t.equal(await server.stop('SIGTERM'), 0, 'and the server shuts down cleanly afterwards')
})
