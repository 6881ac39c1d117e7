import t from 'tap'
import { ConversationIndex, RedisConversationIndex } from '../../services/conversations.js'

t.test('an answer points at its session, per tenant, until the TTL; the oldest go first', async (t) => {
  let now = 0
  const index = new ConversationIndex({ ttlMs: 1_000, maxEntries: 2, now: () => now })
  index.remember('tenant', 'answer one', 's1')
  t.equal(index.find('tenant', 'answer one'), 's1')
  t.equal(index.find('other', 'answer one'), undefined, "another tenant's identical text is not the same conversation")
  t.equal(index.find('tenant', 'answer one '), undefined, 'only the exact text')
  index.remember('tenant', '', 's0')
  t.equal(index.find('tenant', ''), undefined, 'an empty answer identifies nothing')
  index.remember('tenant', 'answer two', 's2')
  index.remember('tenant', 'answer three', 's3')
  t.equal(index.find('tenant', 'answer one'), undefined, 'forgotten past maxEntries')
  now = 1_000
  t.equal(index.find('tenant', 'answer three'), undefined, 'forgotten after the TTL')
})

t.test('in Redis, an answer remembered by one replica is found by another, per tenant', { skip: process.env.REDIS_URL ? false : 'REDIS_URL not set (CI sets it)' }, async (t) => {
  const { Redis } = await import('ioredis')
  const target = new URL(process.env.REDIS_URL!)
  target.pathname = '/8'
  const redis = new Redis(target.href)
  t.teardown(() => redis.quit())
  const prefix = `oi-test-conversations-${Math.random().toString(36).slice(2)}:`
  const quiet = { warn() {} }
  const a = new RedisConversationIndex(redis, quiet, 60_000, prefix)
  const b = new RedisConversationIndex(redis, quiet, 60_000, prefix)
  a.remember('tenant', 'the answer', 's1')
  let found = await b.find('tenant', 'the answer')
  while (found === undefined) found = await b.find('tenant', 'the answer') // written in the background
  t.equal(found, 's1')
  t.equal(await b.find('other', 'the answer'), undefined)
  t.equal(await b.find('tenant', 'the answer '), undefined, 'only the exact text')
})
