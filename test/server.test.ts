import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { request } from 'node:https'
import { join } from 'node:path'
import t from 'tap'
import { tempDir } from './helpers/build.js'
import { startServer } from './helpers/server-process.js'

t.test('starts with a banner, answers health, exits 0 on SIGTERM', async (t) => {
  const dataDir = tempDir(t)
  const server = await startServer({ DATA_DIR: dataDir })
  t.teardown(() => server.stop('SIGKILL'))
  t.match(server.stdout(), /docs: +http:\/\/127\.0\.0\.1:\d+\/docs/)
  t.match(server.stdout(), /storage: +SQLite/)
  t.match(server.stdout(), /sandbox: +none/)
  const key = /API key: +(\S+)/.exec(server.stdout())?.[1]
  t.ok(key, 'a generated admin key is printed once')
  const health = await fetch(`${server.url}/v1/health`)
  t.equal(health.status, 200)
  const metrics = await fetch(`${server.url}/metrics`, { headers: { authorization: `Bearer ${key}` } })
  t.equal(metrics.status, 200, 'the printed key works')
  t.equal(await server.stop('SIGTERM'), 0)
  t.notMatch(server.stderr(), new RegExp(key!), 'the generated key is never logged')
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
