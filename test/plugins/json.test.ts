import t from 'tap'
import { MAX_JSON_DEPTH, nestsDeeperThan } from '../../plugins/json.js'
import { auth, build } from '../helpers/build.js'

const objects = (depth: number, leaf = '1') => '{"a":'.repeat(depth) + leaf + '}'.repeat(depth)
const arrays = (depth: number) => '['.repeat(depth) + ']'.repeat(depth)

t.test('nestsDeeperThan counts objects and arrays, not brackets inside strings', async (t) => {
  t.equal(nestsDeeperThan(objects(3), 3), false)
  t.equal(nestsDeeperThan(objects(4), 3), true)
  t.equal(nestsDeeperThan(arrays(4), 3), true)
  t.equal(nestsDeeperThan('[{"a":[{}]}]', 4), false)
  t.equal(nestsDeeperThan('[{"a":[{}]}]', 3), true)
  t.equal(nestsDeeperThan('[[],[],[],[],[],[],[],[]]', 2), false, 'siblings do not add up')
  t.equal(nestsDeeperThan(JSON.stringify({ s: '[[[[[[[[{{{{{{{{' }), 2), false, 'brackets in a string')
  t.equal(nestsDeeperThan(JSON.stringify({ s: 'quote \\" then [[[[[[[[', t: '\\\\' }), 2), false, 'escaped quotes and backslashes')
  t.equal(nestsDeeperThan(JSON.stringify(['\\', [[[[]]]]]), 4), true, 'a string ending in a backslash still ends')
  t.equal(nestsDeeperThan('["unterminated [[[[[[[[[[', 2), false, 'malformed text is left to the parser')
})

t.test('deeply nested JSON bodies get 400 invalid_request, not 500', async (t) => {
  const app = await build(t)
  const session = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json().session_id
  const json = { ...auth(), 'content-type': 'application/json' }
  for (const [name, method, url, payload] of [
    ['session metadata, 10,000 objects', 'POST', '/v1/sessions', `{"metadata":${objects(10_000)}}`],
    ['session metadata, 10,000 arrays', 'POST', '/v1/sessions', `{"metadata":{"a":${arrays(10_000)}}}`],
    ['metadata patch', 'PATCH', `/v1/sessions/${session}`, `{"metadata":${objects(10_000)}}`],
    ['chat messages', 'POST', '/v1/chat', `{"messages":${arrays(10_000)}}`],
    ['one level past the limit', 'POST', '/v1/sessions', `{"metadata":${objects(MAX_JSON_DEPTH)}}`],
  ] as const) {
    const res = await app.inject({ method, url, headers: json, payload })
    t.equal(res.statusCode, 400, name)
    t.same(
      res.json(),
      { error: { message: `JSON nests deeper than ${MAX_JSON_DEPTH} levels`, type: 'validation_error', code: 'invalid_request', param: null } },
      name,
    )
  }
  const unchanged = await app.inject({ url: `/v1/sessions/${session}`, headers: auth() })
  t.same(unchanged.json().metadata, {}, 'the refused patch changed nothing')
})

t.test('JSON at the depth limit is stored and returned intact', async (t) => {
  const app = await build(t)
  // the body object is the first level, metadata the second
  const metadata = JSON.parse(objects(MAX_JSON_DEPTH - 2, '"deep"'))
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(), payload: { metadata } })
  t.equal(created.statusCode, 201)
  t.same(created.json().metadata, metadata)
  const id = created.json().session_id
  t.same((await app.inject({ url: `/v1/sessions/${id}`, headers: auth() })).json().metadata, metadata)
  const patched = await app.inject({ method: 'PATCH', url: `/v1/sessions/${id}`, headers: auth(), payload: { metadata: { again: metadata.a } } })
  t.equal(patched.statusCode, 200)
  t.same(patched.json().metadata, { again: metadata.a })
  t.same((await app.inject({ url: `/v1/sessions/${id}`, headers: auth() })).json().metadata, { again: metadata.a })
})

t.test('the parser keeps refusing prototype poisoning', async (t) => {
  const app = await build(t)
  const res = await app.inject({
    method: 'POST',
    url: '/v1/sessions',
    headers: { ...auth(), 'content-type': 'application/json' },
    payload: '{"metadata":{"__proto__":{"admin":true}}}',
  })
  t.equal(res.statusCode, 400)
  t.match(res.json(), { error: { type: 'validation_error', code: 'invalid_json' } })
})
