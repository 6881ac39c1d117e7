import t from 'tap'
import { auth, build } from '../helpers/build.js'

t.test('GET /metrics: admin keys only; a tenant key gets 403 permission_error', async (t) => {
  const app = await build(t)
  const created = await app.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload: { name: 'tenant' } })
  const tenant = created.json().key

  const denied = await app.inject({ url: '/metrics', headers: auth(tenant) })
  t.equal(denied.statusCode, 403)
  t.match(denied.headers['content-type'], /^application\/json/)
  t.same(denied.json(), { error: { message: 'This route needs an admin key', type: 'permission_error', code: 'forbidden', param: null } })
  t.notMatch(denied.body, /oi_/, 'no series leak into the refusal')
  t.ok(denied.headers['x-request-id'])

  const admin = await app.inject({ url: '/metrics', headers: auth() })
  t.equal(admin.statusCode, 200)
  t.match(admin.headers['content-type'], /^text\/plain/)
  t.match(admin.body, /oi_http_requests_total\{method="GET",route="\/metrics",status="403"\} 1/, 'the refusal is counted')

  const anonymous = await app.inject({ url: '/metrics' })
  t.equal(anonymous.statusCode, 401)
  t.match(anonymous.json(), { error: { type: 'auth_error', code: 'missing_api_key' } })
})
