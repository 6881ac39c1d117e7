import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import t from 'tap'
import { ApiError } from '../../services/errors.js'
import { Workspaces } from '../../services/workspaces.js'

const root = mkdtempSync(join(tmpdir(), 'oi-workspaces-test-'))
t.teardown(() => rmSync(root, { recursive: true, force: true }))
const outside = mkdtempSync(join(tmpdir(), 'oi-workspaces-outside-'))
t.teardown(() => rmSync(outside, { recursive: true, force: true }))
writeFileSync(join(outside, 'secret.txt'), 'top secret')

const MAX = 1024 * 1024
const workspaces = new Workspaces(root, { maxFileBytes: MAX })
let n = 0
const session = () => `ws-${++n}`

const body = (data: Buffer | string, chunk = 64 * 1024) => {
  const buffer = Buffer.from(data)
  const parts: Buffer[] = []
  for (let i = 0; i < buffer.length; i += chunk) parts.push(buffer.subarray(i, i + chunk))
  return Readable.from(parts)
}

async function read(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of stream) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}

const invalidPath = { statusCode: 400, type: 'validation_error', code: 'invalid_path', param: 'path' }

/** File names from a zip's central directory. */
function zipNames(zip: Buffer): string[] {
  const end = zip.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]))
  const count = zip.readUInt16LE(end + 10)
  let at = zip.readUInt32LE(end + 16)
  const names: string[] = []
  for (let i = 0; i < count; i++) {
    const nameLength = zip.readUInt16LE(at + 28)
    const extra = zip.readUInt16LE(at + 30)
    const comment = zip.readUInt16LE(at + 32)
    names.push(zip.subarray(at + 46, at + 46 + nameLength).toString('utf8'))
    at += 46 + nameLength + extra + comment
  }
  return names
}

t.test('paths that leave the workspace are refused', async (t) => {
  const id = session()
  await workspaces.write(id, 'inside.txt', body('hello'))
  mkdirSync(join(workspaces.dir(id), 'sub'))
  symlinkSync(outside, join(workspaces.dir(id), 'out'))
  symlinkSync(join(outside, 'secret.txt'), join(workspaces.dir(id), 'secret-link'))
  for (const path of ['..', '../x', 'a/../../x', 'sub/../../ws-x/file', '/etc/passwd', 'a\0b', 'out', 'out/secret.txt', 'secret-link']) {
    await t.rejects(workspaces.resolve(id, path), invalidPath, `resolve ${JSON.stringify(path)}`)
  }
  await t.rejects(workspaces.readStream(id, 'out/secret.txt'), invalidPath)
  await t.rejects(workspaces.readStream(id, 'secret-link'), invalidPath)
  await t.rejects(workspaces.list(id, 'out'), invalidPath)
  await t.rejects(workspaces.write(id, 'out/new.txt', body('x')), invalidPath)
  await t.rejects(workspaces.remove(id, 'out/secret.txt'), invalidPath)
  t.notOk(existsSync(join(outside, 'new.txt')))
  t.equal(readFileSync(join(outside, 'secret.txt'), 'utf8'), 'top secret')
  t.equal(await workspaces.resolve(id, 'sub/../inside.txt'), join(workspaces.dir(id), 'inside.txt'), 'a .. that stays inside is fine')
  t.throws(() => workspaces.dir('../etc'), { code: 'invalid_request' })
})

t.test('a symlink that stays inside the workspace is followed', async (t) => {
  const id = session()
  await workspaces.write(id, 'data/real.txt', body('real'))
  symlinkSync('data', join(workspaces.dir(id), 'alias'))
  t.equal((await read(await workspaces.readStream(id, 'alias/real.txt'))).toString(), 'real')
})

t.test('binary round trip', async (t) => {
  const id = session()
  const data = Buffer.concat([Buffer.from(Array.from({ length: 256 }, (_, i) => i)), randomBytes(300_000)])
  t.equal(await workspaces.write(id, 'nested/dir/blob.bin', body(data, 7777)), data.length)
  t.ok((await read(await workspaces.readStream(id, 'nested/dir/blob.bin'))).equals(data))
  t.ok(readFileSync(join(workspaces.dir(id), 'nested/dir/blob.bin')).equals(data))
})

t.test('size cap', async (t) => {
  const id = session()
  await workspaces.write(id, 'big.bin', body('original'))
  await t.rejects(workspaces.write(id, 'big.bin', body(randomBytes(MAX + 1))), {
    statusCode: 413,
    type: 'validation_error',
    code: 'payload_too_large',
  })
  t.equal(readFileSync(join(workspaces.dir(id), 'big.bin'), 'utf8'), 'original', 'the old file is untouched')
  t.same(readdirSync(workspaces.dir(id)), ['big.bin'], 'no temporary file is left behind')
  t.equal(await workspaces.write(id, 'exact.bin', body(randomBytes(MAX))), MAX, 'exactly the limit is fine')
})

t.test('a symlink at the target is replaced, not followed', async (t) => {
  const id = session()
  await workspaces.write(id, 'x', body('x'))
  symlinkSync(join(outside, 'secret.txt'), join(workspaces.dir(id), 'link'))
  await workspaces.write(id, 'link', body('replaced'))
  t.equal(readFileSync(join(outside, 'secret.txt'), 'utf8'), 'top secret')
  t.notOk(lstatSync(join(workspaces.dir(id), 'link')).isSymbolicLink())
  t.equal(readFileSync(join(workspaces.dir(id), 'link'), 'utf8'), 'replaced')
})

t.test('list, read errors and remove', async (t) => {
  const id = session()
  t.same(await workspaces.list(id, ''), [], 'a workspace that does not exist yet is empty')
  await workspaces.write(id, 'b.txt', body('bbb'))
  await workspaces.write(id, 'a/one.txt', body('1'))
  await workspaces.write(id, 'a/deep/two.txt', body('22'))
  symlinkSync(outside, join(workspaces.dir(id), 'c-link'))
  const entries = await workspaces.list(id, '')
  t.same(
    entries.map(({ name, path, type, size }) => ({ name, path, type, size })),
    [
      { name: 'a', path: 'a', type: 'directory', size: 0 },
      { name: 'b.txt', path: 'b.txt', type: 'file', size: 3 },
      { name: 'c-link', path: 'c-link', type: 'symlink', size: entries[2]?.size },
    ],
  )
  t.match(entries[1]?.modified_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
  t.same(
    (await workspaces.list(id, 'a')).map((e) => e.path),
    ['a/deep', 'a/one.txt'],
  )
  await t.rejects(workspaces.list(id, 'missing'), { statusCode: 404, code: 'not_found' })
  await t.rejects(workspaces.list(id, 'b.txt'), invalidPath)
  await t.rejects(workspaces.readStream(id, 'missing.txt'), { statusCode: 404, code: 'not_found' })
  await t.rejects(workspaces.readStream(id, 'a'), invalidPath)
  await t.rejects(workspaces.readStream(id, ''), invalidPath)

  await workspaces.remove(id, 'c-link')
  t.ok(existsSync(join(outside, 'secret.txt')), 'removing a symlink leaves its target alone')
  await workspaces.remove(id, 'a')
  t.same(readdirSync(workspaces.dir(id)), ['b.txt'])
  await t.rejects(workspaces.remove(id, 'a'), { statusCode: 404, code: 'not_found' })
  await t.rejects(workspaces.remove(id, ''), invalidPath)
  await workspaces.removeWorkspace(id)
  t.notOk(existsSync(workspaces.dir(id)))
  await workspaces.removeWorkspace(id)
})

t.test('archive', async (t) => {
  const id = session()
  await workspaces.write(id, 'top.txt', body('top'))
  await workspaces.write(id, 'dir/inner.bin', body(Buffer.from([0, 1, 2, 255])))
  mkdirSync(join(workspaces.dir(id), 'empty'))
  symlinkSync(join(outside, 'secret.txt'), join(workspaces.dir(id), 'leak'))
  const zip = await read(workspaces.archive(id))
  t.same(zipNames(zip).sort(), ['dir/', 'dir/inner.bin', 'empty/', 'top.txt'])
  t.notOk(zip.includes(Buffer.from('top secret')))
  const file = join(tmpdir(), `oi-archive-${process.pid}.zip`)
  writeFileSync(file, zip)
  t.teardown(() => rmSync(file, { force: true }))
  try {
    execFileSync('unzip', ['-tq', file])
    t.ok(execFileSync('unzip', ['-p', file, 'dir/inner.bin']).equals(Buffer.from([0, 1, 2, 255])))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  t.same(zipNames(await read(workspaces.archive(session()))), [], 'a missing workspace is an empty zip')
})

t.test('as root, new files belong to the owner of the workspace', { skip: process.getuid?.() !== 0 && 'needs root' }, async (t) => {
  const id = session()
  await workspaces.write(id, 'first.txt', body('1'))
  execFileSync('chown', ['-R', '123456:123456', workspaces.dir(id)])
  await workspaces.write(id, 'made/by/upload.txt', body('2'))
  for (const path of ['made', 'made/by', 'made/by/upload.txt']) t.equal(lstatSync(join(workspaces.dir(id), path)).uid, 123456, path)
})

t.test('errors are ApiErrors', async (t) => {
  const err = await workspaces.resolve(session(), '../x').catch((e: unknown) => e)
  t.type(err, ApiError)
})
