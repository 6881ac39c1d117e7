import { execFileSync, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { inflateRawSync } from 'node:zlib'
import t from 'tap'
import { loadConfig } from '../../config.js'
import { newApiKey } from '../../services/auth.js'
import { ADMIN_KEY, auth, build, type FastifyInstance, type Tap, tempDir } from '../helpers/build.js'
import { deepTree, RAW, rawPath, zipComment } from '../helpers/trees.js'

// Kernels run sandboxed where bubblewrap works; the file routes themselves do not depend on it,
// only the path the code uses for its workspace does.
const bwrap =
  existsSync('/usr/bin/bwrap') &&
  spawnSync('/usr/bin/bwrap', ['--unshare-all', '--ro-bind', '/', '/', '--proc', '/proc', '--dev', '/dev', 'true'], { timeout: 10_000 }).status === 0
const SANDBOX = bwrap ? 'bwrap' : 'none'
const WORKSPACE = bwrap ? '/workspace/' : ''

async function setup(t: Tap, env: Record<string, string> = {}) {
  const app = await build(t, { SANDBOX, ...env })
  const session = await newSession(app)
  return { app, session, files: `/v1/sessions/${session}/files` }
}

async function newSession(app: FastifyInstance, key = ADMIN_KEY): Promise<string> {
  return (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(key) })).json().session_id
}

const q = (path: string) => `?path=${encodeURIComponent(path)}`

function put(app: FastifyInstance, files: string, path: string, payload: Buffer | string, contentType = 'application/octet-stream') {
  return app.inject({ method: 'PUT', url: `${files}/content${q(path)}`, headers: { ...auth(), 'content-type': contentType }, payload })
}

const get = (app: FastifyInstance, files: string, path: string) => app.inject({ url: `${files}/content${q(path)}`, headers: auth() })

async function run(app: FastifyInstance, session: string, code: string) {
  const res = await app.inject({ method: 'POST', url: `/v1/sessions/${session}/execute`, headers: auth(), payload: { language: 'python', code } })
  return res.json() as { exit_code: number; outputs: { stream?: string; content: string }[]; error?: { value: string } }
}

const stdout = (body: Awaited<ReturnType<typeof run>>) =>
  body.outputs
    .filter((o) => o.stream === 'stdout')
    .map((o) => o.content)
    .join('')

function multipart(boundary: string, parts: { name: string; filename: string; type?: string; data: Buffer | string }[]): Buffer {
  const chunks: Buffer[] = []
  for (const part of parts) {
    chunks.push(
      Buffer.from(
        `--${boundary}\r\nContent-Disposition: form-data; name="${part.name}"; filename="${part.filename}"\r\nContent-Type: ${part.type ?? 'application/octet-stream'}\r\n\r\n`,
      ),
      Buffer.from(part.data),
      Buffer.from('\r\n'),
    )
  }
  chunks.push(Buffer.from(`--${boundary}--\r\n`))
  return Buffer.concat(chunks)
}


/** The entries of a zip, read from its central directory, with their contents inflated. */
function unzip(zip: Buffer): Map<string, Buffer> {
  const end = zip.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]))
  if (end < 0) throw new Error('no end of central directory record')
  const count = zip.readUInt16LE(end + 10)
  let at = zip.readUInt32LE(end + 16)
  const entries = new Map<string, Buffer>()
  for (let i = 0; i < count; i++) {
    if (zip.readUInt32LE(at) !== 0x02014b50) throw new Error(`bad central directory header at ${at}`)
    const method = zip.readUInt16LE(at + 10)
    const compressed = zip.readUInt32LE(at + 20)
    const nameLength = zip.readUInt16LE(at + 28)
    const extra = zip.readUInt16LE(at + 30)
    const comment = zip.readUInt16LE(at + 32)
    const local = zip.readUInt32LE(at + 42)
    const name = zip.subarray(at + 46, at + 46 + nameLength).toString('utf8')
    if (zip.readUInt32LE(local) !== 0x04034b50) throw new Error(`bad local header for ${name}`)
    const start = local + 30 + zip.readUInt16LE(local + 26) + zip.readUInt16LE(local + 28)
    const data = zip.subarray(start, start + compressed)
    entries.set(name, method === 8 ? inflateRawSync(data) : Buffer.from(data))
    at += 46 + nameLength + extra + comment
  }
  return entries
}

t.test('PUT then GET is byte-identical, whatever the bytes and the content type', async (t) => {
  const { app, files } = await setup(t)
  // NUL bytes, lone continuation bytes, an overlong encoding and a truncated sequence: nothing a text decoder would keep intact
  const bytes = Buffer.concat([Buffer.from([0x00, 0xff, 0xfe, 0x80, 0xc0, 0xaf, 0xe2, 0x28, 0xa1, 0x00]), randomBytes(256 * 1024), Buffer.from([0xf0, 0x9f])])
  const res = await put(app, files, 'blob.bin', bytes)
  t.equal(res.statusCode, 201)
  t.same(res.json(), { path: 'blob.bin', size: bytes.length })
  const back = await get(app, files, 'blob.bin')
  t.equal(back.statusCode, 200)
  t.equal(back.headers['content-type'], 'application/octet-stream')
  t.equal(back.headers['content-disposition'], "attachment; filename*=UTF-8''blob.bin")
  t.ok(back.rawPayload.equals(bytes), 'same bytes back')

  const json = '{ "not":   "re-serialized" ,"n":1.50 }\n'
  t.equal((await put(app, files, 'data.json', json, 'application/json')).statusCode, 201)
  t.equal((await get(app, files, 'data.json')).body, json, 'a JSON body is stored raw, not parsed')
  t.equal((await put(app, files, 'broken.json', '{ not json', 'application/json')).statusCode, 201, 'and never validated')
  t.equal((await put(app, files, 'note.txt', 'plain', 'text/plain; charset=utf-8')).statusCode, 201)
  t.equal((await get(app, files, 'note.txt')).body, 'plain')

  const replaced = await put(app, files, 'note.txt', 'shorter')
  t.equal(replaced.statusCode, 201)
  t.equal((await get(app, files, 'note.txt')).body, 'shorter', 'PUT replaces the whole file')
  const empty = await put(app, files, 'empty.txt', Buffer.alloc(0))
  t.equal(empty.statusCode, 201)
  t.equal((await get(app, files, 'empty.txt')).rawPayload.length, 0)
})

t.test('list, nested paths and DELETE', async (t) => {
  const { app, files } = await setup(t)
  t.same((await app.inject({ url: files, headers: auth() })).json(), { path: '', entries: [], next_cursor: null }, 'a fresh workspace is empty')
  t.equal((await put(app, files, 'deep/er/still/file.txt', 'nested')).statusCode, 201, 'parents are created')
  await put(app, files, 'top.txt', '12345')
  const root = (await app.inject({ url: files, headers: auth() })).json()
  t.match(root, {
    path: '',
    entries: [
      { name: 'deep', path: 'deep', type: 'directory', size: 0, modified_at: /Z$/ },
      { name: 'top.txt', path: 'top.txt', type: 'file', size: 5, modified_at: /Z$/ },
    ],
  })
  t.equal(root.entries.length, 2)
  const deep = (await app.inject({ url: `${files}${q('deep/er/still')}`, headers: auth() })).json()
  t.match(deep, { path: 'deep/er/still', entries: [{ name: 'file.txt', path: 'deep/er/still/file.txt', type: 'file', size: 6 }] })
  t.equal((await get(app, files, 'deep/er/still/file.txt')).body, 'nested')
  t.equal((await get(app, files, './deep/er/../er/still/file.txt')).body, 'nested', 'dots inside the workspace are fine')

  const missing = await app.inject({ url: `${files}${q('nope')}`, headers: auth() })
  t.equal(missing.statusCode, 404)
  t.match(missing.json(), { error: { type: 'not_found_error', code: 'not_found' } })
  const notFile = await get(app, files, 'missing.txt')
  t.equal(notFile.statusCode, 404)
  t.match(notFile.json(), { error: { code: 'not_found' } })
  const dir = await get(app, files, 'deep')
  t.equal(dir.statusCode, 400, 'a directory cannot be downloaded')
  t.match(dir.json(), { error: { code: 'invalid_path', param: 'path' } })
  t.equal((await app.inject({ url: `${files}/content`, headers: auth() })).statusCode, 400, 'path is required')

  const del = await app.inject({ method: 'DELETE', url: `${files}/content${q('top.txt')}`, headers: auth() })
  t.equal(del.statusCode, 204)
  t.equal(del.body, '')
  t.equal((await get(app, files, 'top.txt')).statusCode, 404)
  t.equal((await app.inject({ method: 'DELETE', url: `${files}/content${q('deep')}`, headers: auth() })).statusCode, 204, 'a whole tree')
  t.same((await app.inject({ url: files, headers: auth() })).json().entries, [])
  t.equal((await app.inject({ method: 'DELETE', url: `${files}/content${q('deep')}`, headers: auth() })).statusCode, 404)
  const root2 = await app.inject({ method: 'DELETE', url: `${files}/content${q('')}`, headers: auth() })
  t.equal(root2.statusCode, 400, 'the workspace itself cannot be deleted')
})

t.test('multipart upload of two files', async (t) => {
  const { app, files } = await setup(t)
  const binary = Buffer.concat([Buffer.from([0, 13, 10, 0xff]), randomBytes(4096), Buffer.from('\r\n--not-the-boundary\r\n')])
  const boundary = `----oi${randomBytes(8).toString('hex')}`
  const res = await app.inject({
    method: 'POST',
    url: `${files}/upload${q('incoming')}`,
    headers: { ...auth(), 'content-type': `multipart/form-data; boundary=${boundary}` },
    payload: multipart(boundary, [
      { name: 'file', filename: 'one.txt', type: 'text/plain', data: 'first file\n' },
      { name: 'file', filename: '../../two.bin', data: binary },
    ]),
  })
  t.equal(res.statusCode, 201)
  t.same(res.json(), {
    files: [
      { path: 'incoming/one.txt', size: 11 },
      { path: 'incoming/two.bin', size: binary.length },
    ],
  }, 'directory parts of a client file name are dropped')
  t.equal((await get(app, files, 'incoming/one.txt')).body, 'first file\n')
  t.ok((await get(app, files, 'incoming/two.bin')).rawPayload.equals(binary))

  const notMultipart = await app.inject({ method: 'POST', url: `${files}/upload`, headers: auth(), payload: { file: 'x' } })
  t.equal(notMultipart.statusCode, 415)
  t.match(notMultipart.json(), { error: { code: 'unsupported_media_type' } })
  const none = await app.inject({
    method: 'POST',
    url: `${files}/upload`,
    headers: { ...auth(), 'content-type': `multipart/form-data; boundary=${boundary}` },
    payload: `--${boundary}--\r\n`,
  })
  t.equal(none.statusCode, 400)
  t.match(none.json(), { error: { type: 'validation_error', param: 'file' } })
})

t.test('multipart upload from a real client (FormData over HTTP)', async (t) => {
  const { app, session } = await setup(t)
  const base = await app.listen({ port: 0, host: '127.0.0.1' })
  const form = new FormData()
  form.append('a', new Blob(['alpha']), 'a.txt')
  form.append('b', new Blob([new Uint8Array([0, 1, 2, 250])]), 'b.bin')
  const res = await fetch(`${base}/v1/sessions/${session}/files/upload`, { method: 'POST', headers: auth(), body: form })
  t.equal(res.status, 201)
  t.same(await res.json(), { files: [{ path: 'a.txt', size: 5 }, { path: 'b.bin', size: 4 }] })
  const back = await fetch(`${base}/v1/sessions/${session}/files/content?path=b.bin`, { headers: auth() })
  t.same([...new Uint8Array(await back.arrayBuffer())], [0, 1, 2, 250])
})

t.test('the archive is a zip of the workspace', async (t) => {
  const { app, files } = await setup(t)
  const binary = randomBytes(100_000)
  await put(app, files, 'readme.md', '# hello\n')
  await put(app, files, 'data/values.bin', binary)
  await put(app, files, 'data/nested/deeper.txt', 'deep')
  const res = await app.inject({ url: `${files}/archive`, headers: auth() })
  t.equal(res.statusCode, 200)
  t.equal(res.headers['content-type'], 'application/zip')
  t.match(res.headers['content-disposition'], /^attachment; filename="workspace-[0-9a-f-]+\.zip"$/)
  const entries = unzip(res.rawPayload)
  t.same([...entries.keys()].sort(), ['data/', 'data/nested/', 'data/nested/deeper.txt', 'data/values.bin', 'readme.md'])
  t.equal(entries.get('readme.md')!.toString(), '# hello\n')
  t.ok(entries.get('data/values.bin')!.equals(binary))
  t.equal(entries.get('data/nested/deeper.txt')!.toString(), 'deep')

  if (spawnSync('unzip', ['-v'], { stdio: 'ignore' }).status === 0) {
    const file = join(tempDir(t), 'workspace.zip')
    writeFileSync(file, res.rawPayload)
    const check = spawnSync('unzip', ['-t', file], { encoding: 'utf8' })
    t.equal(check.status, 0, `unzip -t accepts it: ${check.stdout.trim().split('\n').at(-1)}`)
  }

  const fresh = await newSession(app)
  const empty = await app.inject({ url: `/v1/sessions/${fresh}/files/archive`, headers: auth() })
  t.equal(empty.statusCode, 200, 'a session that never wrote a file gets an empty zip')
  t.equal(unzip(empty.rawPayload).size, 0)
})

t.test('paths that escape the workspace are refused with 400 invalid_path', async (t) => {
  const { app, session, files } = await setup(t)
  const neighbour = await newSession(app)
  await put(app, `/v1/sessions/${neighbour}/files`, 'secret.txt', 'neighbour secret')
  await put(app, files, 'real/ok.txt', 'fine')
  const made = await run(
    app,
    session,
    [
      'import os',
      `os.chdir(${JSON.stringify(WORKSPACE || '.')})`,
      'os.symlink("/etc", "etc_link")',
      'os.symlink("/etc/passwd", "passwd_link")',
      'os.symlink("..", "parent_link")',
      `os.symlink("../${neighbour}", "neighbour_link")`,
      'os.symlink("../../oi-server.db", "db_link")',
      'os.symlink("real", "inside_link")',
      'print(sorted(os.listdir(".")))',
    ].join('\n'),
  )
  t.equal(made.exit_code, 0, `the kernel made the links: ${made.error?.value ?? ''}`)
  t.ok(existsSync(join(app.workspaces.dir(session), '..', '..', 'oi-server.db')), 'db_link aims at the real database')

  const refused = async (res: Awaited<ReturnType<typeof get>>, what: string) => {
    t.equal(res.statusCode, 400, what)
    t.match(res.json(), { error: { type: 'validation_error', code: 'invalid_path', param: 'path' } }, what)
  }
  for (const path of ['../x', '/etc/passwd', 'a/../../x', '..', `../${neighbour}/secret.txt`]) {
    await refused(await get(app, files, path), `GET ${path}`)
    await refused(await put(app, files, path, 'x'), `PUT ${path}`)
    await refused(await app.inject({ method: 'DELETE', url: `${files}/content${q(path)}`, headers: auth() }), `DELETE ${path}`)
    await refused(await app.inject({ url: `${files}${q(path)}`, headers: auth() }), `list ${path}`)
  }
  for (const path of ['etc_link/passwd', 'passwd_link', 'parent_link/x', 'neighbour_link/secret.txt', 'db_link']) {
    await refused(await get(app, files, path), `GET through ${path}`)
  }
  for (const path of ['etc_link', 'parent_link', 'neighbour_link']) {
    await refused(await app.inject({ url: `${files}${q(path)}`, headers: auth() }), `list ${path}`)
  }
  for (const path of ['etc_link/oi-planted', 'parent_link/oi-planted', 'neighbour_link/planted.txt']) {
    await refused(await put(app, files, path, 'planted'), `PUT through ${path}`)
    await refused(await app.inject({ method: 'DELETE', url: `${files}/content${q(path)}`, headers: auth() }), `DELETE through ${path}`)
  }
  t.notOk(existsSync('/etc/oi-planted'), 'nothing was written to /etc')
  t.notOk(existsSync(join(app.workspaces.dir(session), '..', 'oi-planted')), 'nor next to the workspaces')
  t.same(readdirSync(app.workspaces.dir(neighbour)), ['secret.txt'], "nor into the neighbour's workspace")

  const passwd = readFileSync('/etc/passwd')
  const replaced = await put(app, files, 'passwd_link', 'mine')
  t.equal(replaced.statusCode, 201, 'PUT onto a link replaces the link itself')
  t.ok(readFileSync('/etc/passwd').equals(passwd), '/etc/passwd is untouched')
  t.ok(lstatSync(join(app.workspaces.dir(session), 'passwd_link')).isFile())
  t.equal((await app.inject({ method: 'DELETE', url: `${files}/content${q('etc_link')}`, headers: auth() })).statusCode, 204, 'a link can be deleted')
  t.ok(existsSync('/etc/passwd'), 'deleting a link leaves its target alone')

  t.equal((await get(app, files, 'inside_link/ok.txt')).body, 'fine', 'a link that stays inside is followed')
  const listing = (await app.inject({ url: files, headers: auth() })).json().entries as { name: string; type: string }[]
  t.match(listing.find((e) => e.name === 'neighbour_link'), { type: 'symlink' }, 'links are listed as links')
  const archive = unzip((await app.inject({ url: `${files}/archive`, headers: auth() })).rawPayload)
  t.same([...archive.keys()].sort(), ['passwd_link', 'real/', 'real/ok.txt'], 'the archive leaves links out')
})

t.test('FILE_MAX_BYTES: larger files answer 413 and leave nothing behind', async (t) => {
  const { app, files } = await setup(t, { FILE_MAX_BYTES: '1024' })
  t.equal((await put(app, files, 'fits.bin', randomBytes(1024))).statusCode, 201, 'exactly the limit fits')
  const big = await put(app, files, 'big.bin', randomBytes(4096))
  t.equal(big.statusCode, 413)
  t.match(big.json(), { error: { type: 'validation_error', code: 'payload_too_large' } })
  t.equal((await get(app, files, 'big.bin')).statusCode, 404)
  const over = await put(app, files, 'fits.bin', randomBytes(1025))
  t.equal(over.statusCode, 413)
  t.equal((await get(app, files, 'fits.bin')).rawPayload.length, 1024, 'a refused PUT leaves the old file as it was')

  const boundary = 'oi-boundary'
  const upload = await app.inject({
    method: 'POST',
    url: `${files}/upload`,
    headers: { ...auth(), 'content-type': `multipart/form-data; boundary=${boundary}` },
    payload: multipart(boundary, [{ name: 'file', filename: 'huge.bin', data: randomBytes(4096) }]),
  })
  t.equal(upload.statusCode, 413)
  t.match(upload.json(), { error: { code: 'payload_too_large' } })
  t.equal((await get(app, files, 'huge.bin')).statusCode, 404, 'no truncated copy of an oversize upload is kept')
  const previous = (await get(app, files, 'fits.bin')).rawPayload
  const overwrite = await app.inject({
    method: 'POST',
    url: `${files}/upload`,
    headers: { ...auth(), 'content-type': `multipart/form-data; boundary=${boundary}` },
    payload: multipart(boundary, [{ name: 'file', filename: 'fits.bin', data: randomBytes(2048) }]),
  })
  t.equal(overwrite.statusCode, 413)
  t.ok((await get(app, files, 'fits.bin')).rawPayload.equals(previous), 'an oversize upload does not clobber the existing file')
  const names = ((await app.inject({ url: files, headers: auth() })).json().entries as { name: string }[]).map((e) => e.name)
  t.same(names, ['fits.bin'], 'no temporary file is left')
})

t.test('files and code share the workspace', async (t) => {
  const { app, session, files } = await setup(t)
  await put(app, files, 'input/data.csv', 'a,b\n1,2\n')
  const read = await run(app, session, `print(open(${JSON.stringify(`${WORKSPACE}input/data.csv`)}).read().splitlines()[1])`)
  t.equal(stdout(read), '1,2\n', 'a file written by PUT is visible to code')

  const wrote = await run(app, session, `open(${JSON.stringify(`${WORKSPACE}out/result.bin`)}, "wb").write(bytes(range(256)))`)
  t.equal(wrote.error?.value, "[Errno 2] No such file or directory: '" + `${WORKSPACE}out/result.bin'`, 'the directory must exist first')
  await run(app, session, `import os\nos.makedirs(${JSON.stringify(`${WORKSPACE}out`)})\nopen(${JSON.stringify(`${WORKSPACE}out/result.bin`)}, "wb").write(bytes(range(256)))`)
  const back = await get(app, files, 'out/result.bin')
  t.equal(back.statusCode, 200, 'a file written by code is downloadable')
  t.same([...back.rawPayload], [...Array(256).keys()])

  await put(app, files, 'input/data.csv', 'replaced')
  t.equal(stdout(await run(app, session, `print(open(${JSON.stringify(`${WORKSPACE}input/data.csv`)}).read())`)), 'replaced\n')
  const changed = await run(app, session, `open(${JSON.stringify(`${WORKSPACE}input/data.csv`)}, "a").write(" and appended")`)
  t.equal(changed.exit_code, 0, 'code can change a file the server wrote')
  t.equal((await get(app, files, 'input/data.csv')).body, 'replaced and appended')
})

t.test('401 without a key, 404 for unknown and foreign sessions', async (t) => {
  const { app, session, files } = await setup(t)
  await put(app, files, 'mine.txt', 'admin data')
  const { key, record } = newApiKey('other tenant', null)
  await app.store.createApiKey(record)
  const boundary = 'b'
  const routes = (base: string) =>
    [
      ['GET', base, undefined],
      ['GET', `${base}/content${q('mine.txt')}`, undefined],
      ['PUT', `${base}/content${q('planted.txt')}`, 'x'],
      ['DELETE', `${base}/content${q('mine.txt')}`, undefined],
      ['POST', `${base}/upload`, multipart(boundary, [{ name: 'f', filename: 'planted.txt', data: 'x' }])],
      ['GET', `${base}/archive`, undefined],
    ] as const
  const send = (method: string, url: string, payload: string | Buffer | undefined, headers: Record<string, string>) =>
    app.inject({
      method: method as 'GET',
      url,
      headers: { ...headers, ...(payload === undefined ? {} : { 'content-type': method === 'POST' ? `multipart/form-data; boundary=${boundary}` : 'text/plain' }) },
      ...(payload === undefined ? {} : { payload }),
    })

  for (const [method, url, payload] of routes(files)) {
    for (const headers of [{}, auth('wrong-key')]) {
      const res = await send(method, url, payload, headers)
      t.equal(res.statusCode, 401, `${method} ${url}`)
      t.match(res.json(), { error: { type: 'auth_error' } })
    }
    const foreign = await send(method, url, payload, auth(key))
    t.equal(foreign.statusCode, 404, `other tenant: ${method} ${url}`)
    t.match(foreign.json(), { error: { type: 'session_error', code: 'session_not_found' } })
    const unknown = await send(method, url.replace(session, '00000000-0000-4000-8000-000000000000'), payload, auth())
    t.equal(unknown.statusCode, 404, `unknown session: ${method} ${url}`)
    t.match(unknown.json(), { error: { code: 'session_not_found' } })
  }
  t.same(
    ((await app.inject({ url: files, headers: auth() })).json().entries as { name: string }[]).map((e) => e.name),
    ['mine.txt'],
    'nothing was planted or deleted by the refused requests',
  )
  const theirs = await newSession(app, key)
  const own = await app.inject({ method: 'PUT', url: `/v1/sessions/${theirs}/files/content${q('x.txt')}`, headers: { ...auth(key), 'content-type': 'text/plain' }, payload: 'theirs' })
  t.equal(own.statusCode, 201, 'the other tenant works in its own session')
  t.equal((await app.inject({ url: `/v1/sessions/${theirs}/files/content${q('x.txt')}`, headers: auth() })).statusCode, 404, 'which the admin tenant cannot see')
})

t.test('a FIFO is refused at once: no thread waits for a writer, and other requests are answered', async (t) => {
  const { app, session, files } = await setup(t)
  await put(app, files, 'ok.txt', 'fine')
  const dir = app.workspaces.dir(session)
  execFileSync('mkfifo', [join(dir, 'pipe')])
  // One FIFO read more than libuv has threads: had each of them taken a thread in open(2), no
  // request that touches the disk could be answered any more, and this test would never end.
  const threads = Number(process.env.UV_THREADPOOL_SIZE ?? 4)
  const reads = Array.from({ length: threads + 1 }, () => get(app, files, 'pipe'))
  const other = await get(app, files, 'ok.txt')
  t.equal(other.statusCode, 200, 'a concurrent request is answered')
  t.equal(other.body, 'fine')
  for (const res of await Promise.all(reads)) {
    t.equal(res.statusCode, 400)
    t.match(res.json(), { error: { type: 'validation_error', code: 'invalid_path', param: 'path', message: /FIFO, socket or device/ } })
  }

  const server = createServer()
  await new Promise<void>((resolve) => server.listen(join(dir, 'socket'), resolve))
  t.teardown(() => server.close())
  const socket = await get(app, files, 'socket')
  t.equal(socket.statusCode, 400, 'a socket too (it used to be a 500)')
  t.match(socket.json(), { error: { code: 'invalid_path' } })

  const listing = (await app.inject({ url: files, headers: auth() })).json()
  t.match(listing.entries, [{ name: 'ok.txt', type: 'file' }, { name: 'pipe', type: 'other' }, { name: 'socket', type: 'other' }])
  const archive = await app.inject({ url: `${files}/archive`, headers: auth() })
  t.equal(archive.statusCode, 200)
  t.same([...unzip(archive.rawPayload).keys()], ['ok.txt'])
  t.match(zipComment(archive.rawPayload), /FIFOs, sockets or devices: 2/)
})

t.test('names that are not UTF-8 or hold a backslash: listed, archived with a note, deleted', async (t) => {
  const { app, session, files } = await setup(t)
  const dir = app.workspaces.dir(session)
  await put(app, files, 'keep/ok.txt', 'ok')
  writeFileSync(rawPath(dir, RAW), 'raw')
  mkdirSync(rawPath(dir, 'keep', RAW))
  writeFileSync(rawPath(dir, 'keep', RAW, RAW), 'raw in raw')
  writeFileSync(join(dir, 'back\\slash'), 'a backslash')

  const listing = await app.inject({ url: files, headers: auth() })
  t.equal(listing.statusCode, 200)
  t.same(
    listing.json().entries.map((e: { name: string; path: string; lossy_name?: boolean }) => [e.name, e.path, e.lossy_name ?? false]),
    [
      ['back\\slash', 'back\\slash', false],
      ['keep', 'keep', false],
      ['\ufffd\ufffd', '\ufffd\ufffd', true],
    ],
  )
  t.match((await app.inject({ url: `${files}${q('keep')}`, headers: auth() })).json().entries, [{ name: 'ok.txt' }, { name: '\ufffd\ufffd', type: 'directory', lossy_name: true }])
  t.equal((await get(app, files, 'back\\slash')).body, 'a backslash', 'a backslash is an ordinary character in a path')

  const archive = await app.inject({ url: `${files}/archive`, headers: auth() })
  t.equal(archive.statusCode, 200)
  t.same([...unzip(archive.rawPayload).keys()].sort(), ['keep/', 'keep/ok.txt'])
  t.match(zipComment(archive.rawPayload), /names that are not valid UTF-8, contain a backslash or start like a drive \(C:\): 3/)

  t.equal((await app.inject({ method: 'DELETE', url: `${files}/content${q('keep')}`, headers: auth() })).statusCode, 204)
  t.same(readdirSync(dir, { encoding: 'buffer' }).sort(Buffer.compare), [Buffer.from('back\\slash'), RAW])
  t.equal((await app.inject({ method: 'DELETE', url: `/v1/sessions/${session}`, headers: auth() })).statusCode, 204)
  t.notOk(existsSync(dir), 'deleting the session removed the raw name too')
})

t.test('the listing is paginated: limit, cursor and next_cursor', async (t) => {
  const { app, session, files } = await setup(t)
  await put(app, files, 'f00', '')
  const dir = app.workspaces.dir(session)
  for (let i = 1; i < 12; i++) writeFileSync(join(dir, `f${String(i).padStart(2, '0')}`), '')
  const names: string[] = []
  let url = `${files}?limit=5`
  const pages = []
  for (;;) {
    const res = await app.inject({ url, headers: auth() })
    t.equal(res.statusCode, 200)
    const page = res.json()
    pages.push(page.entries.length)
    names.push(...page.entries.map((e: { name: string }) => e.name))
    if (page.next_cursor === null) break
    url = `${files}?limit=5&cursor=${page.next_cursor}`
  }
  t.same(pages, [5, 5, 2])
  t.same(names, Array.from({ length: 12 }, (_, i) => `f${String(i).padStart(2, '0')}`), 'each entry once, in order')
  t.match((await app.inject({ url: files, headers: auth() })).json(), { next_cursor: null, entries: { length: 12 } }, 'the default limit (1000) holds them all')

  for (const [query, param] of [
    ['limit=0', 'limit'],
    ['limit=10001', 'limit'],
    ['cursor=not%20base64', 'cursor'],
    ['cursor=Lw', 'cursor'],
  ]) {
    const res = await app.inject({ url: `${files}?${query}`, headers: auth() })
    t.equal(res.statusCode, 400, query)
    t.match(res.json(), { error: { type: 'validation_error', param } }, query)
  }
})

t.test('WORKSPACE_MAX_MB and WORKSPACE_MAX_FILES: an upload past the quota gets 413 and leaves nothing', async (t) => {
  const { app, files } = await setup(t, { WORKSPACE_MAX_MB: '1', WORKSPACE_MAX_FILES: '4' })
  const names = async () => ((await app.inject({ url: files, headers: auth() })).json().entries as { name: string }[]).map((e) => e.name)
  t.equal((await put(app, files, 'a.bin', randomBytes(600 * 1024))).statusCode, 201)
  const refused = await put(app, files, 'sub/b.bin', randomBytes(600 * 1024))
  t.equal(refused.statusCode, 413)
  t.match(refused.json(), {
    error: {
      type: 'validation_error',
      code: 'workspace_quota_exceeded',
      message: 'The workspace would exceed its quota of 1 MiB (WORKSPACE_MAX_MB); delete files to make room',
      quota: { max_bytes: 1024 * 1024, max_files: 4, used_files: 1 },
    },
  })
  t.same(await names(), ['a.bin'], 'nothing of the refused upload remains: no file, no temporary file, no directory')

  const boundary = 'oi-quota'
  const upload = await app.inject({
    method: 'POST',
    url: `${files}/upload`,
    headers: { ...auth(), 'content-type': `multipart/form-data; boundary=${boundary}` },
    payload: multipart(boundary, [
      { name: 'file', filename: 'small.txt', data: 'fits' },
      { name: 'file', filename: 'big.bin', data: randomBytes(600 * 1024) },
    ]),
  })
  t.equal(upload.statusCode, 413)
  t.match(upload.json(), { error: { code: 'workspace_quota_exceeded' } })
  t.same(await names(), ['a.bin', 'small.txt'], 'the part that fitted is kept, the one that did not left nothing')

  t.equal((await put(app, files, 'c', 'c')).statusCode, 201)
  t.equal((await put(app, files, 'd', 'd')).statusCode, 201)
  const fifth = await put(app, files, 'e', 'e')
  t.equal(fifth.statusCode, 413)
  t.match(fifth.json(), { error: { code: 'workspace_quota_exceeded', message: /quota of 4 files and directories \(WORKSPACE_MAX_FILES\)/ } })
  t.equal((await put(app, files, 'c', 'replaced')).statusCode, 201, 'replacing a file adds no entry')
  t.equal((await app.inject({ method: 'DELETE', url: `${files}/content${q('a.bin')}`, headers: auth() })).statusCode, 204)
  t.equal((await put(app, files, 'e', 'e')).statusCode, 201, 'deleting makes room')
})

t.test('FILE_MAX_BYTES applies to downloads: a larger file gets 413 and is left out of the archive', async (t) => {
  const { app, session, files } = await setup(t, { FILE_MAX_BYTES: '1024' })
  await put(app, files, 'fits.bin', randomBytes(1024))
  const fits = await get(app, files, 'fits.bin')
  t.equal(fits.statusCode, 200)
  t.equal(fits.headers['content-length'], '1024')
  writeFileSync(join(app.workspaces.dir(session), 'big.bin'), randomBytes(2048))
  const big = await get(app, files, 'big.bin')
  t.equal(big.statusCode, 413)
  t.match(big.json(), { error: { type: 'validation_error', code: 'file_too_large', param: 'path', message: /2048 bytes/ } })
  const archive = await app.inject({ url: `${files}/archive`, headers: auth() })
  t.same([...unzip(archive.rawPayload).keys()], ['fits.bin'])
  t.match(zipComment(archive.rawPayload), /files larger than FILE_MAX_BYTES: 1/)
})

t.test('a 2000-deep tree is archived, and deleted with its session', async (t) => {
  const { app, session, files } = await setup(t)
  await put(app, files, 'top.txt', 'top')
  const dir = app.workspaces.dir(session)
  // Runs before the data directory is removed (teardowns run last first), which rmSync could not do this deep.
  t.teardown(() => spawnSync('rm', ['-rf', dir]))
  deepTree(dir, 2000)
  const res = await app.inject({ url: `${files}/archive`, headers: auth() })
  t.equal(res.statusCode, 200)
  const entries = unzip(res.rawPayload)
  t.equal(entries.size, 2002, 'top.txt, 2000 directories and the leaf')
  t.equal(entries.get(`${'d/'.repeat(2000)}leaf.txt`)?.toString(), 'bottom')
  t.equal((await app.inject({ method: 'DELETE', url: `/v1/sessions/${session}`, headers: auth() })).statusCode, 204)
  t.notOk(existsSync(dir))
})

t.test('deleting a session removes its workspace, whatever its code left there', async (t) => {
  const { app, session, files } = await setup(t)
  await put(app, files, 'uploaded.txt', 'by the API')
  const made = await run(
    app,
    session,
    [
      'import os',
      `os.chdir(${JSON.stringify(WORKSPACE || '.')})`,
      'os.makedirs("locked/none/deeper")',
      'open("locked/none/deeper/f", "w").write("f")',
      'open(b"\\xff\\xfe", "w").write("raw")',
      'os.mkfifo("pipe")',
      'os.chmod("locked/none", 0)',
      'os.chmod("locked", 0o555)',
    ].join('\n'),
  )
  t.equal(made.exit_code, 0, `the kernel made the mess: ${made.error?.value ?? ''}`)
  const dir = app.workspaces.dir(session)
  t.ok(readdirSync(dir, { encoding: 'buffer' }).some((name) => name.equals(RAW)))
  const res = await app.inject({ method: 'DELETE', url: `/v1/sessions/${session}`, headers: auth() })
  t.equal(res.statusCode, 204)
  t.notOk(existsSync(dir), 'the workspace is gone')
})

t.test('WORKSPACE_MAX_MB and WORKSPACE_MAX_FILES are validated like the other limits and reach the files API', async (t) => {
  const defaults = loadConfig({})
  t.equal(defaults.WORKSPACE_MAX_MB, 1024)
  t.equal(defaults.WORKSPACE_MAX_FILES, 10_000)
  t.match(loadConfig({ WORKSPACE_MAX_MB: '0', WORKSPACE_MAX_FILES: '0' }), { WORKSPACE_MAX_MB: 0, WORKSPACE_MAX_FILES: 0 }, '0 turns them off')
  t.throws(() => loadConfig({ WORKSPACE_MAX_MB: '-1' }), /^Invalid configuration: WORKSPACE_MAX_MB must be >= 0 \(got "-1"\)$/)
  t.throws(() => loadConfig({ WORKSPACE_MAX_FILES: 'lots' }), /^Invalid configuration: WORKSPACE_MAX_FILES must be integer \(got "lots"\)$/)
  const { app } = await setup(t, { WORKSPACE_MAX_MB: '3', WORKSPACE_MAX_FILES: '7' })
  t.same(app.workspaces.limits, { maxBytes: 3 * 1024 * 1024, maxFiles: 7 })
})
