import { execFileSync, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import {
  chmodSync,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  renameSync,
  rmSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
} from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import t from 'tap'
import { ApiError } from '../../services/errors.js'
import { SessionService } from '../../services/sessions.js'
import { createSqliteStore } from '../../services/store/index.js'
import { Workspaces, workspaceUsage } from '../../services/workspaces.js'
import { deepTree, RAW, rawPath, zipComment } from '../helpers/trees.js'

// rm -rf, not rmSync: the trees below are deeper than PATH_MAX allows a path to be.
const removeAll = (dir: string) => spawnSync('rm', ['-rf', dir])
const root = mkdtempSync(join(tmpdir(), 'oi-workspaces-test-'))
t.teardown(() => removeAll(root))
const outside = mkdtempSync(join(tmpdir(), 'oi-workspaces-outside-'))
t.teardown(() => rmSync(outside, { recursive: true, force: true }))
writeFileSync(join(outside, 'secret.txt'), 'top secret')

const MAX = 1024 * 1024
const workspaces = new Workspaces(root, { maxFileBytes: MAX, quota: { maxBytes: 0, maxFiles: 0 } })
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
  t.equal((await read((await workspaces.readStream(id, 'alias/real.txt')).stream)).toString(), 'real')
})

t.test('binary round trip', async (t) => {
  const id = session()
  const data = Buffer.concat([Buffer.from(Array.from({ length: 256 }, (_, i) => i)), randomBytes(300_000)])
  t.equal(await workspaces.write(id, 'nested/dir/blob.bin', body(data, 7777)), data.length)
  t.ok((await read((await workspaces.readStream(id, 'nested/dir/blob.bin')).stream)).equals(data))
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
  t.same(await workspaces.list(id, ''), { entries: [], nextCursor: null }, 'a workspace that does not exist yet is empty')
  await workspaces.write(id, 'b.txt', body('bbb'))
  await workspaces.write(id, 'a/one.txt', body('1'))
  await workspaces.write(id, 'a/deep/two.txt', body('22'))
  symlinkSync(outside, join(workspaces.dir(id), 'c-link'))
  const { entries } = await workspaces.list(id, '')
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
    (await workspaces.list(id, 'a')).entries.map((e) => e.path),
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

const unlimited = { maxBytes: 0, maxFiles: 0 }

t.test('workspaceUsage: allocated bytes as du counts them, entries, no symlink followed', async (t) => {
  const id = session()
  const dir = workspaces.dir(id)
  t.same(await workspaceUsage(dir, unlimited), { bytes: 0, files: 0, over: false }, 'a missing workspace uses nothing')
  await workspaces.write(id, 'data/full.bin', body(randomBytes(256 * 1024)))
  writeFileSync(join(dir, 'sparse.bin'), '')
  truncateSync(join(dir, 'sparse.bin'), 1024 * 1024 * 1024)
  linkSync(join(dir, 'data/full.bin'), join(dir, 'hardlink.bin'))
  const big = mkdtempSync(join(tmpdir(), 'oi-workspaces-big-'))
  t.teardown(() => removeAll(big))
  writeFileSync(join(big, 'large.bin'), randomBytes(2 * 1024 * 1024))
  symlinkSync(big, join(dir, 'out'))
  writeFileSync(rawPath(dir, RAW), 'raw')
  execFileSync('mkfifo', [join(dir, 'fifo')])

  const usage = await workspaceUsage(dir, unlimited)
  t.match(usage, { files: 7, over: false }, 'data, data/full.bin, sparse.bin, hardlink.bin, out, the raw name and the FIFO')
  const du = Number(execFileSync('du', ['-s', '-B1', dir], { encoding: 'utf8' }).split('\t')[0])
  t.equal(usage.bytes, du, 'the bytes du counts: allocated blocks, a hard-linked file once, the symlinked 2 MiB not at all')
  t.ok(usage.bytes < 1024 * 1024, 'the sparse GiB counts what it occupies, not its length')
  t.same(await workspaces.usage(id), { ...usage, over: false }, 'Workspaces.usage measures the same way')
})

t.test('workspaceUsage stops at the first entry past a limit', async (t) => {
  const dir = workspaces.dir(session())
  mkdirSync(dir)
  for (let i = 0; i < 200; i++) writeFileSync(join(dir, `f${i}`), 'x')
  t.match(await workspaceUsage(dir, { maxBytes: 0, maxFiles: 200 }), { files: 200, over: false }, 'exactly the limit is not over')
  t.match(await workspaceUsage(dir, { maxBytes: 0, maxFiles: 10 }), { files: 11, over: true }, 'counted up to the 11th entry, not the 200')
  const bytes = await workspaceUsage(dir, { maxBytes: 1, maxFiles: 0 })
  t.equal(bytes.over, true)
  t.ok(bytes.files <= 1, `stopped at once (${bytes.files} entries counted)`)
})

t.test('a 2000-deep tree is measured, archived and deleted, without recursion', async (t) => {
  const id = session()
  const dir = workspaces.dir(id)
  await workspaces.write(id, 'top.txt', body('top'))
  deepTree(dir, 2000)
  t.match(await workspaceUsage(dir, unlimited), { files: 2002, over: false })
  const names = zipNames(await read(workspaces.archive(id)))
  t.equal(names.length, 2002, 'top.txt, 2000 directories and the leaf')
  t.ok(names.includes(`${'d/'.repeat(2000)}leaf.txt`))
  await workspaces.remove(id, 'd')
  t.same(readdirSync(dir), ['top.txt'])
})

t.test('names of any bytes and special files: listed, left out of the archive with a note, deleted', async (t) => {
  const id = session()
  const dir = workspaces.dir(id)
  await workspaces.write(id, 'sub/ok.txt', body('ok'))
  writeFileSync(rawPath(dir, RAW), 'raw bytes')
  mkdirSync(rawPath(dir, 'sub', RAW))
  writeFileSync(rawPath(dir, 'sub', RAW, 'inside.txt'), 'in a directory with a raw name')
  writeFileSync(join(dir, 'back\\slash.txt'), 'a backslash')
  writeFileSync(join(dir, 'C:drive.txt'), 'looks like a drive')
  execFileSync('mkfifo', [join(dir, 'fifo')])

  const { entries } = await workspaces.list(id, '')
  t.same(
    entries.map((e) => [e.name, e.path, e.type, e.lossy_name]),
    [
      ['C:drive.txt', 'C:drive.txt', 'file', undefined],
      ['back\\slash.txt', 'back\\slash.txt', 'file', undefined],
      ['fifo', 'fifo', 'other', undefined],
      ['sub', 'sub', 'directory', undefined],
      ['\ufffd\ufffd', '\ufffd\ufffd', 'file', true],
    ],
    'in byte order; the raw name shown with U+FFFD and flagged',
  )
  t.match((await workspaces.list(id, 'sub')).entries, [{ name: 'ok.txt' }, { name: '\ufffd\ufffd', type: 'directory', lossy_name: true }])

  const zip = await read(workspaces.archive(id))
  t.same(zipNames(zip).sort(), ['sub/', 'sub/ok.txt'])
  const comment = zipComment(zip)
  t.match(comment, /FIFOs, sockets or devices: 1/)
  t.match(comment, /names that are not valid UTF-8, contain a backslash or start like a drive \(C:\): 4/)
  t.match(comment, /"sub\/\\ufffd\\ufffd"/, 'examples are given in ASCII')

  await workspaces.remove(id, 'sub')
  t.equal(readdirSync(dir).length, 4, 'a directory holding a raw name is deleted')
  await workspaces.remove(id, 'fifo')
  await workspaces.removeWorkspace(id)
  t.notOk(existsSync(dir))
})

t.test('FIFOs, sockets and devices are refused without being opened', async (t) => {
  const id = session()
  const dir = workspaces.dir(id)
  await workspaces.write(id, 'plain.txt', body('plain'))
  execFileSync('mkfifo', [join(dir, 'fifo')])
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(join(dir, 'socket'), resolve))
  t.teardown(() => server.close())
  const special = ['fifo', 'socket']
  if (process.getuid?.() === 0) {
    execFileSync('mknod', [join(dir, 'null'), 'c', '1', '3'])
    special.push('null')
  }
  // A FIFO opened for reading would wait for a writer: the test would hang here, not fail.
  for (const name of special) await t.rejects(workspaces.readStream(id, name), { ...invalidPath, message: /not a regular file/ }, name)
  const { stream, size } = await workspaces.readStream(id, 'plain.txt')
  t.equal(size, 5)
  t.equal((await read(stream)).toString(), 'plain')
})

t.test('reading a file larger than maxFileBytes is refused with 413, and the archive leaves it out', async (t) => {
  const id = session()
  const dir = workspaces.dir(id)
  await workspaces.write(id, 'fits.bin', body(randomBytes(MAX)))
  writeFileSync(join(dir, 'big.bin'), randomBytes(MAX + 1))
  const fits = await workspaces.readStream(id, 'fits.bin')
  t.equal(fits.size, MAX)
  t.equal((await read(fits.stream)).length, MAX)
  await t.rejects(workspaces.readStream(id, 'big.bin'), { statusCode: 413, type: 'validation_error', code: 'file_too_large', param: 'path' })
  const zip = await read(workspaces.archive(id))
  t.same(zipNames(zip), ['fits.bin'])
  t.match(zipComment(zip), /files larger than FILE_MAX_BYTES: 1/)
})

t.test('listing is paginated in name order, with a cursor that survives changes', async (t) => {
  const id = session()
  const dir = workspaces.dir(id)
  mkdirSync(dir)
  for (let i = 0; i < 25; i++) writeFileSync(join(dir, `f${String(i).padStart(2, '0')}`), '')
  const first = await workspaces.list(id, '', { limit: 10 })
  t.same(first.entries.map((e) => e.name), ['f00', 'f01', 'f02', 'f03', 'f04', 'f05', 'f06', 'f07', 'f08', 'f09'])
  t.type(first.nextCursor, 'string')
  rmSync(join(dir, 'f03'))
  writeFileSync(join(dir, 'f10a'), '')
  const second = await workspaces.list(id, '', { limit: 10, cursor: first.nextCursor! })
  t.same(second.entries.map((e) => e.name), ['f10', 'f10a', 'f11', 'f12', 'f13', 'f14', 'f15', 'f16', 'f17', 'f18'], 'no entry shifted by the deletion')
  const last = await workspaces.list(id, '', { limit: 10, cursor: second.nextCursor! })
  t.same(last.entries.map((e) => e.name), ['f19', 'f20', 'f21', 'f22', 'f23', 'f24'])
  t.equal(last.nextCursor, null)
  t.equal((await workspaces.list(id, '', { limit: 25 })).nextCursor, null, 'a page holding exactly the rest is the last')
  for (const cursor of ['not base64!', 'Lw', 'AA', 'ZA=']) {
    await t.rejects(workspaces.list(id, '', { limit: 10, cursor }), { statusCode: 400, code: 'invalid_request', param: 'cursor' }, cursor)
  }
})

t.test('the quota refuses uploads that would not fit and leaves nothing of them', async (t) => {
  const quota = new Workspaces(join(root, 'quota'), { maxFileBytes: 4 * MAX, quota: { maxBytes: MAX, maxFiles: 5 } })
  t.same(quota.limits, { maxBytes: MAX, maxFiles: 5 })
  const id = 'q1'
  const dir = quota.dir(id)
  const over = { statusCode: 413, type: 'validation_error', code: 'workspace_quota_exceeded' }
  t.equal(await quota.write(id, 'a.bin', body(randomBytes(600 * 1024))), 600 * 1024)
  await t.rejects(quota.write(id, 'new/dir/b.bin', body(randomBytes(600 * 1024))), {
    ...over,
    message: 'The workspace would exceed its quota of 1 MiB (WORKSPACE_MAX_MB); delete files to make room',
    extra: { quota: { max_bytes: MAX, max_files: 5, used_files: 1 } },
  })
  t.same(readdirSync(dir), ['a.bin'], 'no temporary file, and not the directories the refused upload needed')
  t.equal(await quota.write(id, 'a.bin', body(randomBytes(700 * 1024))), 700 * 1024, 'a file replaced frees its room')

  for (const name of ['b', 'c', 'd', 'e']) await quota.write(id, name, body('x'))
  await t.rejects(quota.write(id, 'f', body('x')), { ...over, message: /quota of 5 files and directories \(WORKSPACE_MAX_FILES\)/ })
  await t.rejects(quota.write(id, 'b/c', body('x')), invalidPath, 'a file in the way is still a bad path')
  t.equal(await quota.write(id, 'b', body('yy')), 2, 'replacing a file adds no entry')
  t.same(readdirSync(dir).sort(), ['a.bin', 'b', 'c', 'd', 'e'])

  // Code in the session went past the quota: uploads are refused until files are deleted.
  writeFileSync(join(dir, 'c'), randomBytes(600 * 1024))
  t.match(await quota.usage(id), { over: true })
  await t.rejects(quota.write(id, 'b', body('z')), over)
  await quota.remove(id, 'c')
  t.equal(await quota.write(id, 'b', body('z')), 1)
})

t.test('uploads to one session are measured one after the other', async (t) => {
  const quota = new Workspaces(join(root, 'parallel'), { maxFileBytes: 4 * MAX, quota: { maxBytes: MAX, maxFiles: 0 } })
  const results = await Promise.allSettled([
    quota.write('p', 'one.bin', body(randomBytes(600 * 1024))),
    quota.write('p', 'two.bin', body(randomBytes(600 * 1024))),
  ])
  t.equal(results.filter((r) => r.status === 'fulfilled').length, 1, 'one fits')
  t.match(results.find((r) => r.status === 'rejected'), { reason: { code: 'workspace_quota_exceeded' } }, 'the other measured what the first left')
  t.equal(readdirSync(quota.dir('p')).length, 1)
})

t.test('the archive finds its way back when code moves the directory it is walking', async (t) => {
  const id = session()
  const dir = workspaces.dir(id)
  // Deeper than the levels whose descriptors the walk keeps: from a/b/x it goes back up through `..`.
  const deep = `${'p/'.repeat(40)}a/b`
  const big = randomBytes(4 * MAX)
  const large = new Workspaces(root, { maxFileBytes: 8 * MAX, quota: unlimited })
  await large.write(id, `${deep}/x/big.bin`, body(big))
  for (let i = 0; i < 50; i++) await large.write(id, `${deep}/y${i}/small.txt`, body(`small ${i}`))
  const chunks: Buffer[] = []
  let total = 0
  for await (const chunk of large.archive(id)) {
    // Only big.bin is this large: past 1 MiB of output the walk waits inside x for the zip to take it.
    if (total <= MAX && total + chunk.length > MAX) renameSync(join(dir, deep, 'x'), join(dir, 'moved'))
    chunks.push(chunk as Buffer)
    total += chunk.length
  }
  const names = zipNames(Buffer.concat(chunks))
  t.ok(names.includes(`${deep}/x/big.bin`))
  // Through `..`, x now leads to the top; the walk must notice and go on in b.
  t.equal(names.filter((n) => n.startsWith(`${deep}/y`) && n.endsWith('/small.txt')).length, 50, 'every sibling is archived, also those after the move')
  t.notOk(names.some((n) => n.startsWith('moved')), 'nothing was taken from the wrong place')
})

t.test('removeWorkspace deletes whatever kernel code left', async (t) => {
  const id = session()
  const dir = workspaces.dir(id)
  await workspaces.write(id, 'a/b/c.txt', body('c'))
  writeFileSync(rawPath(dir, RAW), 'raw')
  mkdirSync(rawPath(dir, 'a', RAW))
  writeFileSync(rawPath(dir, 'a', RAW, RAW), 'raw in raw')
  execFileSync('mkfifo', [join(dir, 'a', 'fifo')])
  mkdirSync(join(dir, 'locked/none'), { recursive: true })
  writeFileSync(join(dir, 'locked/none/f'), 'f')
  chmodSync(join(dir, 'locked/none'), 0)
  chmodSync(join(dir, 'locked'), 0o555)
  deepTree(join(dir, 'a'), 300)
  await workspaces.removeWorkspace(id)
  t.notOk(existsSync(dir), 'nothing is left (a raw name used to stop the removal and its failure was taken for "already gone")')
})

t.test('what cannot be deleted is reported, after deleting everything else', async (t) => {
  const id = session()
  await workspaces.write(id, 'keep/stuck.txt', body('x'))
  await workspaces.write(id, 'other/gone.txt', body('y'))
  const stuck = join(workspaces.dir(id), 'keep/stuck.txt')
  if (spawnSync('chattr', ['+i', stuck]).status !== 0) {
    t.pass('not checked: chattr +i is not available here (it needs root and a file system such as ext4)')
    return
  }
  t.teardown(() => spawnSync('chattr', ['-i', stuck]))
  await t.rejects(workspaces.removeWorkspace(id), {
    message: `Could not delete ${id}: 1 entry left, first keep/stuck.txt (EPERM)`,
    failures: [{ path: 'keep/stuck.txt', code: 'EPERM' }],
  })
  t.same(readdirSync(workspaces.dir(id)), ['keep'], 'the rest is gone')
  const failed = await workspaces.remove(id, 'keep').catch((err: unknown) => err)
  t.match(failed, { message: 'Could not delete keep: 1 entry left, first stuck.txt (EPERM)' })
  t.notOk(failed instanceof ApiError, 'a server failure (500, logged), not a bad request')
})

t.test('the idle sweep removes expired workspaces and logs what it could not delete', async (t) => {
  const store = createSqliteStore(':memory:')
  await store.migrate()
  let now = Date.now()
  const errors: { obj: Record<string, unknown>; msg: string }[] = []
  const sessions = new SessionService({
    store,
    logger: { info: () => {}, error: (obj, msg) => errors.push({ obj: obj as Record<string, unknown>, msg }) },
    defaultModel: 'model',
    ttlHours: 1,
    now: () => now,
  })
  t.teardown(async () => {
    await sessions.stop()
    await store.close()
  })
  // What plugins/kernels.ts registers (after stopping the kernels).
  sessions.onDelete((id) => workspaces.removeWorkspace(id))
  const [clean, stuck] = [await sessions.create('tenant'), await sessions.create('tenant')]
  for (const { id } of [clean, stuck]) {
    await workspaces.write(id, 'a/b.txt', body('b'))
    writeFileSync(rawPath(workspaces.dir(id), 'a', RAW), 'raw')
    execFileSync('mkfifo', [join(workspaces.dir(id), 'pipe')])
  }
  const immutable = join(workspaces.dir(stuck.id), 'a/b.txt')
  const chattr = spawnSync('chattr', ['+i', immutable]).status === 0
  if (chattr) t.teardown(() => spawnSync('chattr', ['-i', immutable]))

  now += 2 * 3_600_000
  t.equal(await sessions.sweepIdle(), 2)
  t.notOk(existsSync(workspaces.dir(clean.id)), 'the expired workspace is gone, raw names and FIFO included')
  if (!chattr) return t.same(errors, [], 'nothing failed (chattr +i is not available here to make a deletion fail)')
  t.same(readdirSync(workspaces.dir(stuck.id), { recursive: true }), ['a', 'a/b.txt'], 'all but the immutable file is gone')
  t.match(errors, [
    {
      msg: 'Session cleanup hook failed',
      obj: { sessionId: stuck.id, reason: 'expired', err: { message: `Could not delete ${stuck.id}: 1 entry left, first a/b.txt (EPERM)` } },
    },
  ])
})

t.test(
  'as an unprivileged server (Docker), directories kernel code locked are measured and deleted',
  { skip: process.getuid?.() !== 0 && 'needs root to run a child as another user' },
  async (t) => {
    const base = mkdtempSync(join(tmpdir(), 'oi-workspaces-unprivileged-'))
    t.teardown(() => removeAll(base))
    chmodSync(base, 0o755)
    const dir = join(base, 'ws', 's1')
    mkdirSync(join(dir, 'none/deeper'), { recursive: true })
    writeFileSync(join(dir, 'none/deeper/f'), 'f')
    mkdirSync(join(dir, 'readonly'))
    writeFileSync(join(dir, 'readonly/g'), 'g')
    mkdirSync(join(dir, 'nosearch'))
    writeFileSync(join(dir, 'nosearch/h'), 'h')
    writeFileSync(rawPath(dir, RAW), 'raw')
    execFileSync('mkfifo', [join(dir, 'fifo')])
    // What a kernel sharing the server's uid (no root) can do to the files it made.
    execFileSync('chown', ['-R', '65534:65534', join(base, 'ws')])
    chmodSync(join(dir, 'none'), 0)
    chmodSync(join(dir, 'readonly'), 0o555)
    chmodSync(join(dir, 'nosearch'), 0o600)
    const module = new URL('../../services/workspaces.ts', import.meta.url).href
    const script = [
      `const { Workspaces, workspaceUsage } = await import(${JSON.stringify(module)})`,
      `const workspaces = new Workspaces(${JSON.stringify(join(base, 'ws'))}, { maxFileBytes: 1024, quota: { maxBytes: 0, maxFiles: 0 } })`,
      `console.log(JSON.stringify(await workspaceUsage(workspaces.dir('s1'), { maxBytes: 0, maxFiles: 0 })))`,
      `await workspaces.removeWorkspace('s1')`,
    ].join('\n')
    const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { uid: 65534, gid: 65534, encoding: 'utf8' })
    t.equal(child.status, 0, child.stderr)
    t.match(JSON.parse(child.stdout), { files: 9, over: false }, 'every entry counted, inside the locked directories too')
    t.notOk(existsSync(dir), 'and all of it deleted')
  },
)
