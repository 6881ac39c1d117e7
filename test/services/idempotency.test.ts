import t from 'tap'
import { IdempotencyKeys } from '../../services/idempotency.js'

const response = (text: string) => ({ status: 200, headers: { 'content-type': 'text/plain' }, body: Buffer.from(text) })

t.test('run once, replay after, 409 while running, 422 for another request, forgotten after the TTL', async (t) => {
  let now = 0
  const keys = new IdempotencyKeys({ ttlMs: 1_000, now: () => now })
  const first = keys.begin('tenant', 'k', 'body-a')
  t.equal(first.kind, 'run')
  t.throws(() => keys.begin('tenant', 'k', 'body-a'), { statusCode: 409, code: 'idempotency_in_progress' })
  t.throws(() => keys.begin('tenant', 'k', 'body-b'), { statusCode: 422, code: 'idempotency_key_reused', retryable: false })
  if (first.kind === 'run') first.finish(response('answer'))
  t.match(keys.begin('tenant', 'k', 'body-a'), { kind: 'replay', response: { status: 200 } })
  t.equal(keys.begin('other-tenant', 'k', 'body-b').kind, 'run', 'keys are per tenant')
  now = 1_000
  t.equal(keys.begin('tenant', 'k', 'body-b').kind, 'run', 'after the TTL the key is free')
})

t.test('an abandoned claim frees the key; the oldest keys go past maxKeys', async (t) => {
  const keys = new IdempotencyKeys({ maxKeys: 2 })
  const claim = keys.begin('t', 'a', 'x')
  if (claim.kind === 'run') claim.abandon()
  t.equal(keys.begin('t', 'a', 'x').kind, 'run', 'a failure without side effects can be retried')
  for (const key of ['b', 'c']) {
    const c = keys.begin('t', key, 'x')
    if (c.kind === 'run') c.finish(response(key))
  }
  t.equal(keys.begin('t', 'a', 'y').kind, 'run', 'the oldest key was forgotten')
  t.equal(keys.begin('t', 'c', 'x').kind, 'replay')
})

t.test('claim: a first attempt always runs, and its retries then find it', async (t) => {
  const keys = new IdempotencyKeys()
  const first = keys.claim('tenant', 'fp', 'fp')
  first.finish({ status: 200, headers: {}, body: Buffer.from('one') })
  t.match(keys.begin('tenant', 'fp', 'fp'), { kind: 'replay', response: { body: Buffer.from('one') } }, 'a retry replays')
  const again = keys.claim('tenant', 'fp', 'fp')
  t.equal(again.kind, 'run', 'the same request as a new first attempt runs again')
  t.throws(() => keys.begin('tenant', 'fp', 'fp'), { statusCode: 409, code: 'idempotency_in_progress' }, 'its retry waits for it')
  first.finish({ status: 200, headers: {}, body: Buffer.from('stale') })
  again.finish({ status: 200, headers: {}, body: Buffer.from('two') })
  t.match(keys.begin('tenant', 'fp', 'fp'), { kind: 'replay', response: { body: Buffer.from('two') } }, 'the replaced attempt cannot overwrite the new one')
})
