import t, { type Test } from 'tap'
import { KeyResolver, newApiKey, type RevocationChannel } from '../../services/auth.js'
import { createSqliteStore } from '../../services/store/index.js'

async function setup(t: Test, channel?: RevocationChannel) {
  const store = createSqliteStore(':memory:')
  await store.migrate()
  const keys = new KeyResolver(['admin-key'], store, { channel })
  t.teardown(async () => {
    await keys.flush()
    await store.close()
  })
  const managed = async (expiresAt: string | null = null) => {
    const { key, record } = newApiKey('k', expiresAt)
    await store.createApiKey(record)
    return { key, id: record.id }
  }
  return { store, keys, managed }
}

/** A listener that records its calls and can be awaited. */
function listener() {
  let calls = 0
  let fire!: () => void
  const called = new Promise<void>((resolve) => (fire = resolve))
  return {
    fn: () => {
      calls++
      fire()
    },
    called,
    get calls() {
      return calls
    },
  }
}

t.test('revoke ends every watch of that key once, and only of that key', async (t) => {
  const published: string[] = []
  const { keys, managed } = await setup(t, { publish: async (id) => void published.push(id) })
  const a = await managed()
  const b = await managed()
  const [a1, a2, b1] = [listener(), listener(), listener()]
  const wa1 = await keys.watch(a.key, a1.fn)
  const wa2 = await keys.watch(a.key, a2.fn)
  const wb1 = await keys.watch(b.key, b1.fn)
  t.match(wa1?.principal, { tenantId: `key:${a.id}`, admin: false, keyId: a.id, expiresAt: null })
  t.ok(wa2 && wb1)

  t.equal(await keys.revoke(a.id), true)
  await Promise.all([a1.called, a2.called])
  t.equal(a1.calls, 1)
  t.equal(a2.calls, 1)
  t.equal(b1.calls, 0, 'the other key is untouched')
  t.same(published, [a.id], 'the revocation is published for the other replicas')
  t.equal(await keys.resolve(a.key), undefined)

  t.equal(await keys.revoke(a.id), false, 'a second revoke finds nothing')
  t.same(published, [a.id])
  wa1!.stop()
  t.equal(a1.calls, 1, 'stop after the end is harmless')
})

t.test('a stopped watch is not called; a revocation from another replica ends the rest', async (t) => {
  const { keys, managed } = await setup(t)
  const a = await managed()
  const [stopped, kept] = [listener(), listener()]
  const first = await keys.watch(a.key, stopped.fn)
  await keys.watch(a.key, kept.fn)
  first!.stop()
  keys.ended(a.id)
  await kept.called
  t.equal(stopped.calls, 0)
  t.equal(kept.calls, 1)
})

t.test('a key expiring while watched ends its watch', async (t) => {
  const { keys, managed } = await setup(t)
  const soon = await managed(new Date(Date.now() + 300).toISOString())
  const later = await managed(new Date(Date.now() + 3_600_000).toISOString())
  const [expiring, lasting] = [listener(), listener()]
  const watched = await keys.watch(soon.key, expiring.fn)
  t.match(watched?.principal, { keyId: soon.id, expiresAt: String })
  const kept = await keys.watch(later.key, lasting.fn)
  t.teardown(() => kept?.stop())
  // expiry timers are unref'd (a server is kept alive by its socket); this test has none
  const alive = setInterval(() => {}, 1000)
  t.teardown(() => clearInterval(alive))
  await expiring.called
  t.equal(expiring.calls, 1)
  t.equal(await keys.resolve(soon.key), undefined, 'the key itself no longer resolves')
  t.equal(lasting.calls, 0)
})

t.test('a key revoked while its watch is being set up is refused, not watched forever', async (t) => {
  const { store, keys, managed } = await setup(t)
  const a = await managed()
  // the revocation lands after the lookup has read the key and before the listener exists
  const find = store.findApiKeyByHash.bind(store)
  let revokeDuringLookup = true
  store.findApiKeyByHash = async (hash) => {
    const record = await find(hash)
    if (revokeDuringLookup) {
      revokeDuringLookup = false
      await keys.revoke(a.id)
    }
    return record
  }
  const l = listener()
  t.equal(await keys.watch(a.key, l.fn), undefined)
  t.equal(l.calls, 0)
})

t.test('admin keys and unknown keys', async (t) => {
  const { keys } = await setup(t)
  const admin = await keys.watch('admin-key', () => t.fail('an admin key never ends'))
  t.same(admin?.principal, { tenantId: 'admin', admin: true, keyId: null, expiresAt: null })
  admin!.stop()
  t.equal(await keys.watch('oik_unknown', () => t.fail('never called')), undefined)
  t.equal(await keys.watch('nope', () => t.fail('never called')), undefined)
})

t.test('a managed key is read from the store once while cached, and a revocation drops it at once', async (t) => {
  const store = createSqliteStore(':memory:')
  await store.migrate()
  let lookups = 0
  const counted = new Proxy(store, {
    get(target, name, receiver) {
      if (name === 'findApiKeyByHash') return (hash: string) => (lookups++, target.findApiKeyByHash(hash))
      const value = Reflect.get(target, name, receiver)
      return typeof value === 'function' ? value.bind(target) : value
    },
  })
  const keys = new KeyResolver(['admin-key'], counted, { cacheMs: 60_000 })
  const other = new KeyResolver(['admin-key'], counted, { cacheMs: 60_000 })
  t.teardown(async () => {
    await keys.flush()
    await other.flush()
    await store.close()
  })
  const make = async () => {
    const { key, record } = newApiKey('k', null)
    await store.createApiKey(record)
    return { key, id: record.id }
  }
  const a = await make()
  for (let i = 0; i < 5; i++) t.match(await keys.resolve(a.key), { keyId: a.id })
  t.equal(lookups, 1, 'five requests, one query')
  t.equal(await keys.resolve('oik_unknown'), undefined)
  t.equal(await keys.resolve('oik_unknown'), undefined)
  t.equal(lookups, 3, 'an unknown key is not remembered: a key made on another replica works at once')

  t.equal(await keys.revoke(a.id), true)
  t.equal(await keys.resolve(a.key), undefined, 'revoked here: refused on the next request')

  // another replica revokes: this one hears it through the channel (plugins/auth.ts calls ended)
  const b = await make()
  t.ok(await other.resolve(b.key))
  t.ok(await keys.revoke(b.id))
  t.ok(await other.resolve(b.key), 'not told yet: still cached (bounded by cacheMs)')
  other.ended(b.id)
  t.equal(await other.resolve(b.key), undefined, 'told: refused at once')

  // a revocation that lands while the key is being read must not leave it cached
  const c = await make()
  const racing = new KeyResolver(['admin-key'], new Proxy(counted, {
    get(target, name, receiver) {
      if (name === 'findApiKeyByHash')
        return async (hash: string) => {
          const found = await target.findApiKeyByHash(hash)
          await racing.revoke(c.id)
          return found
        }
      return Reflect.get(target, name, receiver)
    },
  }), { cacheMs: 60_000 })
  t.ok(await racing.resolve(c.key), 'the request that raced the revocation gets through, as before')
  t.equal(await keys.resolve(c.key), undefined)
  t.equal(await racing.resolve(c.key), undefined, 'and the key is not remembered')

  const expiring = newApiKey('soon', new Date(Date.now() + 200).toISOString())
  await store.createApiKey(expiring.record)
  t.ok(await keys.resolve(expiring.key))
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(await keys.resolve(expiring.key), undefined, 'a cached key still expires on time')
})
