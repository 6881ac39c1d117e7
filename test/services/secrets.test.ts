import { randomBytes } from 'node:crypto'
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { loadSecretsKey, SecretBox } from '../../services/crypto.js'
import { MIN_MASKED_LENGTH, SecretsService } from '../../services/secrets.js'
import type { SecretRecord, Store } from '../../services/store/types.js'
import { tempDir } from '../helpers/build.js'

/** Just the secrets part of a store, in memory. */
function memoryStore() {
  const rows = new Map<string, SecretRecord>()
  let reads = 0
  const store = {
    async listSecrets(tenantId: string) {
      reads++
      return [...rows.entries()]
        .filter(([k]) => k.startsWith(`${tenantId}\u0000`))
        .map(([, r]) => r)
        .sort((a, b) => a.name.localeCompare(b.name))
    },
    async putSecret(tenantId: string, name: string, ciphertext: string) {
      const at = new Date().toISOString()
      rows.set(`${tenantId}\u0000${name}`, { name, ciphertext, createdAt: at, updatedAt: at })
    },
    async deleteSecret(tenantId: string, name: string) {
      return rows.delete(`${tenantId}\u0000${name}`)
    },
  }
  return { store: store as unknown as Store, rows, reads: () => reads }
}

const box = () => new SecretBox(randomBytes(32))

t.test('SecretBox: round trip, fresh nonce each time, versioned blob', async (t) => {
  const b = box()
  const blob = b.seal('hunter2 ünïcødé 🔑', 'tenant/NAME')
  t.match(blob, /^v1\.[\w-]{16}\.[\w-]{22}\.[\w-]+$/, 'v1.<iv 12 bytes>.<tag 16 bytes>.<data>')
  t.equal(b.open(blob, 'tenant/NAME'), 'hunter2 ünïcødé 🔑')
  t.not(b.seal('same', 'c'), b.seal('same', 'c'), 'a new nonce per value')
  t.equal(b.open(b.seal('', 'c'), 'c'), '', 'the empty string survives')
  t.notOk(blob.includes('hunter2'))
  t.throws(() => new SecretBox(randomBytes(16)), /32 bytes/)
})

t.test('SecretBox: tampering, another context or another key → throws', async (t) => {
  const b = box()
  const blob = b.seal('the value', 'tenant-a/TOKEN')
  const [version, iv, tag, data] = blob.split('.') as [string, string, string, string]
  const flip = (part: string) => {
    const bytes = Buffer.from(part, 'base64url')
    bytes[0] = bytes[0]! ^ 0x01
    return bytes.toString('base64url')
  }
  t.throws(() => b.open([version, iv, tag, flip(data)].join('.'), 'tenant-a/TOKEN'), 'a changed ciphertext')
  t.throws(() => b.open([version, iv, flip(tag), data].join('.'), 'tenant-a/TOKEN'), 'a changed tag')
  t.throws(() => b.open([version, flip(iv), tag, data].join('.'), 'tenant-a/TOKEN'), 'a changed nonce')
  t.throws(() => b.open([version, iv, tag, data.slice(0, -2)].join('.'), 'tenant-a/TOKEN'), 'a cut ciphertext')
  t.throws(() => b.open(blob, 'tenant-b/TOKEN'), 'another tenant')
  t.throws(() => b.open(blob, 'tenant-a/OTHER'), 'another name')
  t.throws(() => box().open(blob, 'tenant-a/TOKEN'), 'another key')
  t.throws(() => b.open(['v2', iv, tag, data].join('.'), 'tenant-a/TOKEN'), /unknown secret format/)
  t.throws(() => b.open('garbage', 'tenant-a/TOKEN'), /unknown secret format/)
})

t.test('loadSecretsKey: SECRETS_KEY wins; otherwise a 0600 key file, made once and reused', async (t) => {
  const dir = tempDir(t)
  const hex = 'cd'.repeat(32)
  t.same(loadSecretsKey(hex, join(dir, 'unused.key')), Buffer.from(hex, 'hex'))
  t.notOk(existsSync(join(dir, 'unused.key')))

  const file = join(dir, 'nested', 'secrets.key')
  const first = loadSecretsKey(undefined, file)
  t.equal(first.length, 32)
  t.equal(statSync(file).mode & 0o777, 0o600)
  t.equal(statSync(join(dir, 'nested')).mode & 0o777, 0o700)
  t.same(loadSecretsKey(undefined, file), first, 'the same key on the next start')
  const sealed = new SecretBox(first).seal('kept', 'c')
  t.equal(new SecretBox(loadSecretsKey(undefined, file)).open(sealed, 'c'), 'kept', 'values survive a restart')

  // a file written by an operator (with a trailing newline) is read as is
  const own = join(dir, 'own.key')
  writeFileSync(own, `${'ef'.repeat(32)}\n`, { mode: 0o600 })
  t.same(loadSecretsKey(undefined, own), Buffer.from('ef'.repeat(32), 'hex'))
  t.equal(readFileSync(own, 'utf8'), `${'ef'.repeat(32)}\n`, 'never rewritten')
})

t.test('redactor: every occurrence, longest value first, short values not masked', async (t) => {
  const { store } = memoryStore()
  const secrets = new SecretsService(store, box())
  await secrets.put('t1', 'LONG', 'abcd-1234-efgh')
  await secrets.put('t1', 'PART', 'abcd-1234')
  await secrets.put('t1', 'TINY', 'x'.repeat(MIN_MASKED_LENGTH - 1))
  const { env, redact } = await secrets.forTenant('t1')
  t.same(env, { LONG: 'abcd-1234-efgh', PART: 'abcd-1234', TINY: 'xxx' }, 'every value is injected')
  t.equal(redact('a abcd-1234-efgh b abcd-1234 c abcd-1234-efgh'), 'a [secret:LONG] b [secret:PART] c [secret:LONG]')
  t.equal(redact('xxx stays: too short to mask without masking everything'), 'xxx stays: too short to mask without masking everything')
  t.equal(redact('nothing here'), 'nothing here')
  t.equal(redact(''), '')
  t.equal(redact('abcd-1234abcd-1234'), '[secret:PART][secret:PART]', 'adjacent occurrences')

  const none = await secrets.forTenant('nobody')
  t.same(none.env, {})
  t.equal(none.redact('abcd-1234-efgh'), 'abcd-1234-efgh', "another tenant's values are not this tenant's business")
})

t.test('redactAll masks the values of every loaded tenant (log lines)', async (t) => {
  const { store } = memoryStore()
  const secrets = new SecretsService(store, box())
  await secrets.put('t1', 'A', 'value-of-a')
  await secrets.put('t2', 'B', 'value-of-b')
  t.equal(secrets.redactAll('value-of-a value-of-b'), 'value-of-a value-of-b', 'nothing loaded yet')
  await secrets.forTenant('t1')
  await secrets.forTenant('t2')
  t.equal(secrets.redactAll('{"msg":"value-of-a value-of-b"}'), '{"msg":"[secret:A] [secret:B]"}')
  // a log line is JSON, where quotes, backslashes and newlines in a value come escaped
  const odd = 'pa"ss\\word\nline2'
  await secrets.put('t3', 'ODD', odd)
  await secrets.forTenant('t3')
  const line = JSON.stringify({ msg: `failed with ${odd}` })
  t.notOk(line.includes(odd), 'the raw value is not in the line as written')
  t.equal(secrets.redactAll(line), '{"msg":"failed with [secret:ODD]"}')
  t.equal(JSON.parse(secrets.redactAll(line)).msg, 'failed with [secret:ODD]')
})

t.test('cache: loaded once, reloaded after each change; changed values stay masked', async (t) => {
  const { store, reads } = memoryStore()
  const secrets = new SecretsService(store, box())
  await secrets.put('t1', 'TOKEN', 'first-value')
  await secrets.forTenant('t1')
  await secrets.forTenant('t1')
  t.equal(reads(), 1, 'decrypted once for many runs')

  await secrets.put('t1', 'TOKEN', 'second-value')
  const rotated = await secrets.forTenant('t1')
  t.equal(reads(), 2)
  t.same(rotated.env, { TOKEN: 'second-value' }, 'kernels started now get the new value')
  // a kernel started before still has the first value in its environment
  t.equal(rotated.redact('first-value second-value'), '[secret:TOKEN] [secret:TOKEN]')

  t.equal(await secrets.delete('t1', 'TOKEN'), true)
  t.equal(await secrets.delete('t1', 'TOKEN'), false)
  const gone = await secrets.forTenant('t1')
  t.same(gone.env, {})
  t.equal(gone.redact('first-value second-value'), '[secret:TOKEN] [secret:TOKEN]')

  // a retired value reused under another name is named after the current secret
  await secrets.put('t1', 'RENAMED', 'first-value')
  t.equal((await secrets.forTenant('t1')).redact('first-value'), '[secret:RENAMED]')
  const [row] = await store.listSecrets('t1')
  t.same(await secrets.list('t1'), [{ name: 'RENAMED', created_at: row!.createdAt, updated_at: row!.updatedAt }], 'list shows no value')
})

t.test('stream redactor: a value split across reads is masked whole', async (t) => {
  const { store } = memoryStore()
  const secrets = new SecretsService(store, box())
  await secrets.put('t1', 'API_TOKEN', 's3cr3t-value-123')
  const { stream } = await secrets.forTenant('t1')

  const feed = (pieces: string[]) => {
    const s = stream()
    const shown = pieces.map((p) => s.push(p))
    return { shown, all: shown.join('') + s.flush() }
  }
  const oneByOne = feed([...'token: s3cr3t-value-123\n'])
  t.equal(oneByOne.all, 'token: [secret:API_TOKEN]\n')
  t.notOk(oneByOne.shown.some((p) => p.includes('s3c')), 'no piece shows the start of the value')

  t.equal(feed(['s3cr3t-val', 'ue-123 and s3c', 'r3t-value-123']).all, '[secret:API_TOKEN] and [secret:API_TOKEN]')
  t.same(feed(['plain text\n', 'more\n']).shown, ['plain text\n', 'more\n'], 'output that cannot be a value is not held')
  t.same(feed(['ends with s3cr', 'ipt']).shown, ['ends with ', 's3cript'], 'a false start is released by the next read')
  t.equal(feed(['s3cr3t-value-12']).all, 's3cr3t-value-12', 'a prefix left at the end is shown once the stream ends')
  t.equal(feed(['s3cr3t-value-123s3cr3t-value-123']).all, '[secret:API_TOKEN][secret:API_TOKEN]')

  const empty = (await new SecretsService(memoryStore().store, box()).forTenant('t1')).stream()
  t.equal(empty.push('s3cr'), 's3cr', 'no secrets: nothing held')
  t.equal(empty.flush(), '')
})
