import t from 'tap'
import { ConversationIndex } from '../../services/conversations.js'

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
