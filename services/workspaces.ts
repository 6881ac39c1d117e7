import { isUtf8 } from 'node:buffer'
import { randomBytes } from 'node:crypto'
import { constants as fsConstants, type Stats } from 'node:fs'
import { chmod, type FileHandle, lchown, lstat, mkdir, open, opendir, realpath, rename, rmdir, unlink } from 'node:fs/promises'
import { isAbsolute, join, posix, relative, resolve, sep } from 'node:path'
import { PassThrough, type Readable, Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import yazl from 'yazl'
import { ApiError, invalidRequest, notFound } from './errors.js'

export interface WorkspaceEntry {
  name: string
  path: string
  /** `other`: a FIFO, socket or device, which the files API never opens. */
  type: 'file' | 'directory' | 'symlink' | 'other'
  size: number
  modified_at: string
  /**
   * The real name is not valid UTF-8 (kernel code can make such names): `name` and `path` show
   * U+FFFD in place of the bad bytes and cannot address the entry.
   */
  lossy_name?: true
}

export interface WorkspacePage {
  entries: WorkspaceEntry[]
  /** Pass as `cursor` to get the entries that follow; null on the last page. */
  nextCursor: string | null
}

/** The disk quota of one workspace; 0 turns a limit off. */
export interface WorkspaceLimits {
  /** Allocated bytes: st_blocks × 512, so a sparse file counts what it really occupies. */
  maxBytes: number
  /** Entries below the workspace: files, directories, symlinks and special files alike. */
  maxFiles: number
}

export interface WorkspaceUsage {
  /** Allocated bytes of the workspace directory and of every entry below it. */
  bytes: number
  /** Entries below the workspace directory. */
  files: number
  /** A limit is exceeded. The walk stopped at the first entry past it: `bytes` and `files` are then lower bounds. */
  over: boolean
}

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_DIRECTORY, O_NOFOLLOW, O_NONBLOCK, O_NOCTTY } = fsConstants
/** Linux's O_PATH (the same value on x86-64 and arm64), which Node does not export: a handle that cannot read, only name. */
const O_PATH = 0o10000000
const DIR_FLAGS = O_RDONLY | O_DIRECTORY | O_NOFOLLOW
const SESSION_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/
const MiB = 1024 * 1024
const NO_NAME = Buffer.alloc(0)

/** A name in a directory: a string from a client's path, or the raw bytes read from the disk. */
type Name = string | Buffer

/**
 * Every operation below walks from an open descriptor of the workspace, one component at a time,
 * through `/proc/self/fd/N/name` with O_NOFOLLOW. Kernel code runs concurrently and may swap a
 * directory for a symlink at any moment; a check on paths followed by a second lookup would let
 * it redirect this (root) process outside the workspace. Names read from the disk stay bytes
 * (Buffers): decoded, a name that is not UTF-8 would no longer name its file.
 */
function below(dir: FileHandle, name?: Name): string | Buffer {
  const base = `/proc/self/fd/${dir.fd}`
  if (name === undefined) return base
  return typeof name === 'string' ? `${base}/${name}` : Buffer.concat([Buffer.from(`${base}/`), name])
}

const escapes = () => invalidRequest('Path escapes the workspace', 'path', 'invalid_path')
const invalidPath = (message: string) => invalidRequest(message, 'path', 'invalid_path')
const tooLarge = (limit: number) => new ApiError(413, 'validation_error', 'payload_too_large', `The file is larger than ${limit} bytes`, 'body')
const tooLargeToRead = (size: number, limit: number) =>
  new ApiError(413, 'validation_error', 'file_too_large', `The file has ${size} bytes; files larger than ${limit} bytes (FILE_MAX_BYTES) cannot be downloaded`, 'path')

function quotaExceeded(limits: WorkspaceLimits, used: WorkspaceUsage, what: 'bytes' | 'files'): ApiError {
  const limit =
    what === 'bytes' ? `${limits.maxBytes / MiB} MiB (WORKSPACE_MAX_MB)` : `${limits.maxFiles} files and directories (WORKSPACE_MAX_FILES)`
  return new ApiError(413, 'validation_error', 'workspace_quota_exceeded', `The workspace would exceed its quota of ${limit}; delete files to make room`, null, {
    quota: { max_bytes: limits.maxBytes, max_files: limits.maxFiles, used_bytes: used.bytes, used_files: used.files },
  })
}

const errno = (err: unknown) => (err as NodeJS.ErrnoException | undefined)?.code
/** The entry went away or was replaced while we looked (kernel code runs meanwhile). */
const vanished = (err: unknown) => ['ENOENT', 'ENOTDIR', 'ELOOP'].includes(errno(err) ?? '')
const denied = (err: unknown) => errno(err) === 'EACCES' || errno(err) === 'EPERM'

function fsError(err: unknown): unknown {
  const code = errno(err)
  if (code === 'ENOENT') return notFound('File')
  // A symlink or a file where the walk needed a real directory: refused, never followed.
  if (code === 'ELOOP' || code === 'ENOTDIR') return escapes()
  if (code === 'EISDIR' || code === 'ENOTEMPTY' || code === 'EEXIST') return invalidPath('A directory is in the way')
  // Only a server that is not root meets these: kernel code took the permissions away.
  if (code === 'EACCES' || code === 'EPERM') return invalidPath('Permission denied: code in the session changed the permissions of this path')
  if (code === 'ENXIO') return invalidPath('The path is not a regular file (FIFO, socket or device)')
  if (code === 'ENAMETOOLONG') return invalidPath('The path is too long')
  return err
}

async function closeQuietly(handle: FileHandle | undefined): Promise<void> {
  await handle?.close().catch(() => {})
}

const lossy = (name: Buffer) => name.toString('utf8')
const allocated = (stat: Stats) => stat.blocks * 512

/**
 * Gives the owner back read, write and search permission on a directory that kernel code took
 * them from (chmod 000 or 555). Only a server that is not root needs this, and it owns every file
 * its kernels make. Through /proc/self/fd, so it works on an O_PATH handle and follows no symlink.
 */
async function grantOwner(handle: FileHandle): Promise<boolean> {
  const uid = process.geteuid?.()
  if (uid === undefined || uid === 0) return false
  const stat = await handle.stat()
  if (!stat.isDirectory() || stat.uid !== uid || (stat.mode & 0o700) === 0o700) return false
  await chmod(`/proc/self/fd/${handle.fd}`, (stat.mode & 0o7777) | 0o700)
  return true
}

/** Runs an operation on an entry of `dir`, once more after restoring the owner's access to `dir` if it was denied. */
async function withAccess<T>(dir: FileHandle, operation: () => Promise<T>): Promise<T> {
  try {
    return await operation()
  } catch (err) {
    if (!denied(err) || !(await grantOwner(dir).catch(() => false))) throw err
    return operation()
  }
}

/** Opens a directory without following a symlink, restoring its owner's access if it was taken. */
async function openDir(path: string | Buffer): Promise<FileHandle> {
  try {
    return await open(path, DIR_FLAGS)
  } catch (err) {
    if (!denied(err)) throw err
    const handle = await open(path, O_PATH | O_NOFOLLOW)
    try {
      if (!(await grantOwner(handle))) throw err
    } finally {
      await handle.close()
    }
    return open(path, DIR_FLAGS)
  }
}

const openDirIn = (dir: FileHandle, name: Name) => withAccess(dir, () => openDir(below(dir, name)))

/** lstat of an entry of `dir`; undefined when it is gone, or out of reach even after restoring the owner's access. */
async function lstatIn(dir: FileHandle, name: Name): Promise<Stats | undefined> {
  return withAccess(dir, () => lstat(below(dir, name))).catch(lost)
}

/**
 * Opens a regular file of `dir` for reading. Nothing else is ever opened: the name is first held
 * with O_PATH|O_NOFOLLOW, which opens no FIFO (that would block a thread until a writer comes),
 * no device (opening some acts on them) and no symlink, and its type is checked with fstat on
 * that descriptor, so kernel code cannot swap the file between the check and the open. The file
 * is then reopened through that very descriptor, non-blocking all the same.
 */
async function openRegularIn(dir: FileHandle, name: Name): Promise<{ file: FileHandle; stat: Stats }> {
  const handle = await open(below(dir, name), O_PATH | O_NOFOLLOW)
  try {
    const held = await handle.stat()
    if (held.isSymbolicLink()) throw escapes()
    if (held.isDirectory()) throw invalidPath('The path is a directory')
    if (!held.isFile()) throw invalidPath('The path is not a regular file (FIFO, socket or device)')
    const file = await open(`/proc/self/fd/${handle.fd}`, O_RDONLY | O_NONBLOCK | O_NOCTTY)
    try {
      const stat = await file.stat()
      if (!stat.isFile() || stat.ino !== held.ino || stat.dev !== held.dev) throw invalidPath('The path is not a regular file')
      return { file, stat }
    } catch (err) {
      await closeQuietly(file)
      throw err
    }
  } finally {
    await handle.close()
  }
}

/** The first `size` bytes of `file` (the size it had when it was checked); the handle is closed at the end. */
function readUpTo(file: FileHandle, size: number): Readable {
  if (size > 0) return file.createReadStream({ start: 0, end: size - 1 })
  void closeQuietly(file)
  return new PassThrough().end()
}

/** Opens the directory `parts` below `root` without following symlinks; optionally creates missing ones. */
async function openBelow(root: FileHandle, parts: string[], create?: { uid: number; gid: number } | null): Promise<FileHandle> {
  let dir: FileHandle | undefined
  try {
    for (const part of parts) {
      const at = dir ?? root
      if (create !== undefined) {
        const made = await mkdir(below(at, part), { mode: 0o755 }).then(
          () => true,
          (err: NodeJS.ErrnoException) => {
            if (err.code !== 'EEXIST') throw err
            return false
          },
        )
        if (made && create) await lchown(below(at, part), create.uid, create.gid)
      }
      const next = await open(below(at, part), DIR_FLAGS)
      await dir?.close()
      dir = next
    }
    // A handle of its own even for the root itself, so callers always close what they get.
    return dir ?? (await open(below(root), O_RDONLY | O_DIRECTORY))
  } catch (err) {
    await closeQuietly(dir)
    throw err
  }
}

/** Opens the deepest existing directory along `parts` and says how many parts that took. */
async function openDeepest(root: FileHandle, parts: string[]): Promise<{ dir: FileHandle; depth: number }> {
  let dir: FileHandle | undefined
  let depth = 0
  try {
    for (const part of parts) {
      const next = await open(below(dir ?? root, part), DIR_FLAGS).catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return undefined
        throw err
      })
      if (!next) break
      await dir?.close()
      dir = next
      depth++
    }
    return { dir: dir ?? (await open(below(root), O_RDONLY | O_DIRECTORY)), depth }
  } catch (err) {
    await closeQuietly(dir)
    throw err
  }
}

/** The names in an open directory, as raw bytes, read a few at a time (a directory may hold millions). */
async function* namesIn(dir: FileHandle): AsyncGenerator<Buffer> {
  const stream = await withAccess(dir, () => opendir(below(dir), { encoding: 'buffer' as BufferEncoding, bufferSize: 64 })).catch(lost)
  if (!stream) return
  // Leaving the loop early (return or throw) closes the stream.
  for await (const dirent of stream) yield dirent.name as unknown as Buffer
}

/** An entry met by `walk`; `dir` holds it and stays open until the consumer asks for the next event. */
interface WalkEntry {
  kind: 'entry'
  dir: FileHandle
  name: Buffer
  stat: Stats
  /** Names of the directories from the start of the walk down to `dir`. Live: read it, never keep it. */
  at: readonly Buffer[]
  /** Set to true on a directory entry to leave its contents out of the walk. */
  skip: boolean
}

/** A directory of `dir` whose contents have all been walked. */
interface WalkLeave {
  kind: 'leave'
  dir: FileHandle
  name: Buffer
  at: readonly Buffer[]
}

/** A directory of `dir` that could not be opened even after restoring its owner's access. */
interface WalkUnreadable {
  kind: 'unreadable'
  dir: FileHandle
  name: Buffer
  at: readonly Buffer[]
  error: unknown
}

type WalkEvent = WalkEntry | WalkLeave | WalkUnreadable

/** A directory met in a listing, to be walked later: what lstat said it was. */
interface Subdir {
  name: Buffer
  dev: number
  ino: number
}

interface Frame extends Subdir {
  /** Subdirectories met in it and not walked yet. */
  pending: Subdir[]
  /** Its descriptor, kept while the walk is below it (only for the top KEEP_OPEN levels). */
  handle?: FileHandle
}

/** Levels whose descriptors stay open during a walk: within them, going up costs nothing. */
const KEEP_OPEN = 32

async function* entriesOf(dir: FileHandle, frame: Frame, at: readonly Buffer[]): AsyncGenerator<WalkEntry> {
  for await (const name of namesIn(dir)) {
    const stat = await lstatIn(dir, name)
    if (!stat) continue
    const entry: WalkEntry = { kind: 'entry', dir, name, stat, at, skip: false }
    yield entry
    if (stat.isDirectory() && !entry.skip) frame.pending.push({ name, dev: stat.dev, ino: stat.ino })
  }
}

/** Opens `name` in `dir` if it is still the directory `frame` recorded. */
async function reopen(dir: FileHandle, frame: Subdir): Promise<FileHandle | undefined> {
  return verified(await open(below(dir, frame.name), DIR_FLAGS).catch(lost), frame)
}

/** The handle if it is the directory `expected` recorded; otherwise it is closed. */
async function verified(handle: FileHandle | undefined, expected: Subdir): Promise<FileHandle | undefined> {
  const stat = await handle?.stat().catch(lost)
  if (handle && stat?.dev === expected.dev && stat.ino === expected.ino) return handle
  await closeQuietly(handle)
  return undefined
}

/** Undefined for a directory that vanished or was made unreadable; any other failure stops the walk. */
function lost(err: unknown): undefined {
  if (vanished(err) || denied(err)) return undefined
  throw err
}

/**
 * Walks the tree below `start` (an open directory, left open) without recursion and without
 * following symlinks. Every entry is lstat'ed once; a directory's entries come out as they are
 * read (so a consumer can stop inside a huge directory), then its subdirectories are walked one
 * after the other, then `leave` is emitted for it.
 *
 * Time is linear in the number of entries and descriptors are bounded, however deep the tree: a
 * directory is entered from its parent's descriptor; the top KEEP_OPEN levels keep theirs, and
 * below them a directory is left through `..`, checked to be the parent recorded on the way down
 * (device and inode). When kernel code moved a directory meanwhile, the walk finds its way again
 * by the recorded names from the deepest descriptor it kept, and skips what it cannot find.
 */
async function* walk(start: FileHandle): AsyncGenerator<WalkEvent> {
  const first = await start.stat()
  const frames: Frame[] = [{ name: NO_NAME, dev: first.dev, ino: first.ino, pending: [], handle: start }]
  const at: Buffer[] = []
  let current = start
  try {
    yield* entriesOf(current, frames[0]!, at)
    for (;;) {
      const frame = frames.at(-1)!
      const next = frame.pending.pop()
      if (next !== undefined) {
        let child: FileHandle
        try {
          child = await openDirIn(current, next.name)
        } catch (error) {
          if (vanished(error)) continue
          if (!denied(error)) throw error
          yield { kind: 'unreadable', dir: current, name: next.name, at, error }
          continue
        }
        if (frames.length <= KEEP_OPEN) frame.handle = current
        else await current.close()
        current = child
        const entered: Frame = { ...next, pending: [] }
        frames.push(entered)
        at.push(next.name)
        yield* entriesOf(current, entered, at)
        continue
      }
      frames.pop()
      at.pop()
      const parent = frames.at(-1)
      if (!parent) return
      let up = parent.handle ?? (await verified(await open(below(current, '..'), DIR_FLAGS).catch(lost), parent))
      let intact = true
      if (!up) {
        let depth = frames.findLastIndex((f) => f.handle)
        up = frames[depth]!.handle!
        for (depth++; depth < frames.length; depth++) {
          const again = await reopen(up, frames[depth]!)
          if (!again) break
          if (!frames[depth - 1]!.handle) await up.close()
          up = again
        }
        // The chain broke: what was below the break moved away and is not walked.
        intact = depth === frames.length
        frames.length = depth
        at.length = depth - 1
      }
      await current.close()
      current = up
      if (intact) yield { kind: 'leave', dir: current, name: frame.name, at }
    }
  } finally {
    for (const frame of frames) if (frame.handle !== start && frame.handle !== current) await closeQuietly(frame.handle)
    if (current !== start) await closeQuietly(current)
  }
}

/** The usage of the tree below an open directory, stopping at the first entry past a limit. */
async function measure(root: FileHandle, limits: WorkspaceLimits): Promise<WorkspaceUsage> {
  const { maxBytes, maxFiles } = limits
  let bytes = allocated(await root.stat())
  let files = 0
  const over = () => (maxBytes > 0 && bytes > maxBytes) || (maxFiles > 0 && files > maxFiles)
  // A file with several hard links occupies its blocks once.
  const linked = new Set<string>()
  if (over()) return { bytes, files, over: true }
  for await (const event of walk(root)) {
    if (event.kind !== 'entry') continue
    const { stat } = event
    files++
    const key = `${stat.dev}:${stat.ino}`
    if (stat.isDirectory() || stat.nlink < 2 || !linked.has(key)) bytes += allocated(stat)
    if (!stat.isDirectory() && stat.nlink > 1) linked.add(key)
    if (over()) return { bytes, files, over: true }
  }
  return { bytes, files, over: false }
}

/**
 * Measures a workspace: allocated bytes (st_blocks × 512) and entries below `dir`, walked without
 * following symlinks, in time linear in the number of entries, with a bounded number of open
 * descriptors. Stops at the first entry past a limit (0 = no limit): `over` is then true and the
 * counts are lower bounds, so a tree of millions of files costs no more than `maxFiles` entries.
 *
 * Safe while kernel code changes the tree: entries that vanish are skipped, names are handled as
 * bytes (any name, UTF-8 or not), FIFOs, sockets and devices are lstat'ed, never opened. When the
 * server is not root, a directory whose owner (the server's user) lost access to it is given
 * back u+rwx, so that nothing can hide from the count. A missing `dir` measures 0. Rejects only
 * when the walk itself cannot go on (for example, no descriptor left).
 */
export async function workspaceUsage(dir: string, limits: WorkspaceLimits): Promise<WorkspaceUsage> {
  const root = await openDir(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined
    throw err
  })
  if (!root) return { bytes: 0, files: 0, over: false }
  try {
    return await measure(root, limits)
  } finally {
    await root.close()
  }
}

/** Why an entry is left out of an archive; the zip's comment says how many of each. */
const OMITTED = {
  symlink: 'symlinks',
  special: 'FIFOs, sockets or devices',
  name: 'names that are not valid UTF-8, contain a backslash or start like a drive (C:)',
  long: 'paths longer than a zip entry name can be (65535 bytes)',
  large: 'files larger than FILE_MAX_BYTES',
  unreadable: 'directories that could not be read',
} as const

class Omissions {
  private readonly counts = new Map<keyof typeof OMITTED, number>()
  private readonly examples: string[] = []

  add(reason: keyof typeof OMITTED, at: readonly Buffer[], name: Buffer): void {
    this.counts.set(reason, (this.counts.get(reason) ?? 0) + 1)
    if (this.examples.length < 10) this.examples.push([...at, name].map(lossy).join('/').slice(0, 200))
  }

  /** ASCII only (a zip comment has no declared encoding), or undefined when nothing was left out. */
  comment(): string | undefined {
    if (this.counts.size === 0) return undefined
    const ascii = (text: string) => JSON.stringify(text).replace(/[^\x20-\x7e]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
    const counts = [...this.counts].map(([reason, n]) => `${OMITTED[reason]}: ${n}`).join('; ')
    return `oi-server left out: ${counts}. For example: ${this.examples.map(ascii).join(', ')}`
  }
}

/** A name yazl can store as it is: valid UTF-8 (the entries are flagged UTF-8), no backslash (read as a separator), no drive. */
const archivable = (name: Buffer, top: boolean) => isUtf8(name) && !name.includes(0x5c) && !(top && /^[A-Za-z]:/.test(lossy(name)))

interface RemovalFailure {
  path: string
  code: string | undefined
}

/** Deletes everything below the open directory `dir`; returns what could not be deleted. */
async function emptyDirectory(dir: FileHandle): Promise<RemovalFailure[]> {
  const failures: RemovalFailure[] = []
  const attempt = async (event: WalkEvent, operation: (path: string | Buffer) => Promise<void>) => {
    await withAccess(event.dir, () => operation(below(event.dir, event.name))).catch((err: unknown) => {
      // Not empty: because of a failure inside, already listed, or of code writing meanwhile, which another pass settles.
      if (errno(err) === 'ENOENT' || errno(err) === 'ENOTEMPTY') return
      failures.push({ path: [...event.at, event.name].map(lossy).join('/'), code: errno(err) })
    })
  }
  for await (const event of walk(dir)) {
    if (event.kind === 'entry' && !event.stat.isDirectory()) await attempt(event, unlink)
    else if (event.kind === 'leave') await attempt(event, rmdir)
    else if (event.kind === 'unreadable') failures.push({ path: [...event.at, event.name].map(lossy).join('/'), code: errno(event.error) })
  }
  return failures
}

/**
 * Deletes `name` in `dir` and everything below it, whatever it holds. Kernel code may still be
 * writing into it (a kernel that would not stop): a directory that is not empty at the end is
 * walked again, up to three times. Resolves false when there was nothing to delete; rejects with
 * the list of what could not be deleted, having deleted everything else.
 */
async function removeTree(dir: FileHandle, name: Name): Promise<boolean> {
  let failures: RemovalFailure[] = []
  for (let pass = 1; ; pass++) {
    const stat = await lstatIn(dir, name)
    if (!stat) return pass > 1
    try {
      if (!stat.isDirectory()) {
        await withAccess(dir, () => unlink(below(dir, name)))
        return true
      }
      const tree = await openDirIn(dir, name)
      try {
        failures = await emptyDirectory(tree)
      } finally {
        await tree.close()
      }
      await withAccess(dir, () => rmdir(below(dir, name)))
      return true
    } catch (err) {
      if (errno(err) === 'ENOENT') return true
      const again = vanished(err) || errno(err) === 'ENOTEMPTY' || errno(err) === 'EEXIST'
      if (again && pass < 3) continue
      const shown = typeof name === 'string' ? name : lossy(name)
      const first = failures[0] ?? { path: shown, code: errno(err) }
      const left = failures.length > 1 ? `${failures.length} entries` : '1 entry'
      // No errno code of its own: this is the server failing (a 500, logged), not a bad path.
      throw Object.assign(new Error(`Could not delete ${shown}: ${left} left, first ${first.path} (${first.code ?? 'error'})`), {
        cause: err,
        failures: failures.slice(0, 20),
      })
    }
  }
}

const encodeCursor = (name: Buffer) => name.toString('base64url')

function decodeCursor(cursor: string): Buffer {
  const name = Buffer.from(cursor, 'base64url')
  if (name.length === 0 || name.length > 1024 || encodeCursor(name) !== cursor || name.includes(0x2f) || name.includes(0))
    throw invalidRequest('Invalid cursor: pass back the next_cursor of the previous page', 'cursor')
  return name
}

interface Located {
  /** The lexical absolute path asked for. */
  target: string
  /** Real path of the workspace; `parts` are relative to it, free of symlinks and `..`. */
  workspaceReal: string
  parts: string[]
  /** The normalized relative path, as shown back to clients. */
  display: string
  exists: boolean
}

const isOutside = (rel: string) => rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel)

export class Workspaces {
  private readonly root: string
  /** The quota, for callers that measure workspaces themselves (the kernel manager). */
  readonly limits: WorkspaceLimits
  /** The write in progress per session, while a quota is on: each one measures what the previous left. */
  private readonly writes = new Map<string, Promise<unknown>>()

  constructor(
    rootDir: string,
    private readonly opts: { maxFileBytes: number; quota: WorkspaceLimits },
  ) {
    this.root = resolve(rootDir)
    this.limits = { ...opts.quota }
  }

  dir(sessionId: string): string {
    if (!SESSION_ID.test(sessionId)) throw invalidRequest('Invalid session id', 'session_id')
    return join(this.root, sessionId)
  }

  /** The session's workspace measured against the quota (see `workspaceUsage`). */
  usage(sessionId: string): Promise<WorkspaceUsage> {
    return workspaceUsage(this.dir(sessionId), this.limits)
  }

  /**
   * The absolute path of `relPath` in the session's workspace. Throws 400 invalid_path for `..`
   * escapes, absolute paths, NUL bytes and symlinks that lead outside the workspace.
   */
  async resolve(sessionId: string, relPath: string): Promise<string> {
    return (await this.locate(sessionId, relPath)).target
  }

  /**
   * One page of a directory, in byte order of the names. Each page reads the names of the whole
   * directory but keeps only `limit` of them and lstats only those; `cursor` is the last name of
   * the previous page (encoded), so entries made or deleted meanwhile neither shift nor repeat others.
   */
  async list(sessionId: string, relPath = '', page: { limit: number; cursor?: string } = { limit: 1000 }): Promise<WorkspacePage> {
    const after = page.cursor === undefined ? undefined : decodeCursor(page.cursor)
    const located = await this.locate(sessionId, relPath)
    if (!located.exists) {
      if (located.parts.length === 0) return { entries: [], nextCursor: null }
      throw notFound('Directory')
    }
    return this.inWorkspace(located, async (root) => {
      const dir = await openBelow(root, located.parts)
      try {
        const keep = page.limit + 1
        let names: Buffer[] = []
        for await (const name of namesIn(dir)) {
          if (after && Buffer.compare(name, after) <= 0) continue
          names.push(name)
          if (names.length >= 4 * keep) names = names.sort(Buffer.compare).slice(0, keep)
        }
        names = names.sort(Buffer.compare).slice(0, keep)
        const more = names.length > page.limit
        if (more) names.length = page.limit
        const entries: WorkspaceEntry[] = []
        for (const raw of names) {
          const stat = await lstatIn(dir, raw)
          if (!stat) continue
          const name = lossy(raw)
          entries.push({
            name,
            path: posix.join(located.display, name),
            type: stat.isSymbolicLink() ? 'symlink' : stat.isDirectory() ? 'directory' : stat.isFile() ? 'file' : 'other',
            size: stat.isDirectory() ? 0 : stat.size,
            modified_at: stat.mtime.toISOString(),
            ...(isUtf8(raw) ? {} : { lossy_name: true as const }),
          })
        }
        return { entries, nextCursor: more ? encodeCursor(names.at(-1)!) : null }
      } finally {
        await dir.close()
      }
    })
  }

  /**
   * A regular file's content and size. FIFOs, sockets and devices are refused (400) without being
   * opened, files larger than `maxFileBytes` with 413; what is streamed is the size checked, even
   * if code appends to the file meanwhile.
   */
  async readStream(sessionId: string, relPath: string): Promise<{ stream: Readable; size: number }> {
    const located = await this.locate(sessionId, relPath)
    const name = located.parts.at(-1)
    if (name === undefined) throw invalidPath('The path is a directory')
    if (!located.exists) throw notFound('File')
    return this.inWorkspace(located, async (root) => {
      const parent = await openBelow(root, located.parts.slice(0, -1))
      try {
        const { file, stat } = await openRegularIn(parent, name)
        if (stat.size > this.opts.maxFileBytes) {
          await closeQuietly(file)
          throw tooLargeToRead(stat.size, this.opts.maxFileBytes)
        }
        return { stream: readUpTo(file, stat.size), size: stat.size }
      } finally {
        await parent.close()
      }
    })
  }

  /**
   * Streams `source` into the file at `relPath` (parents are created) and returns its size. The
   * bytes go to a temporary file renamed over the target at the end, so readers never see half a
   * file and a symlink at the target is replaced, never followed. With a quota, the workspace is
   * measured first and the upload refused (413 workspace_quota_exceeded) as soon as it would not
   * fit; nothing of a refused upload remains, not even the directories it would have needed.
   */
  async write(sessionId: string, relPath: string, source: Readable): Promise<number> {
    const owner = await this.ensureWorkspace(sessionId)
    const located = await this.locate(sessionId, relPath, true)
    if (located.parts.length === 0) throw invalidPath('A file path is required')
    const save = () => this.inWorkspace(located, (root) => this.save(root, located.parts, source, owner))
    if (this.limits.maxBytes === 0 && this.limits.maxFiles === 0) return save()
    // Two uploads measured at once would each count on the same free room.
    const previous = this.writes.get(sessionId) ?? Promise.resolve()
    const done = previous.then(save)
    const settled = done.catch(() => {})
    this.writes.set(sessionId, settled)
    void settled.then(() => {
      if (this.writes.get(sessionId) === settled) this.writes.delete(sessionId)
    })
    return done
  }

  /** Deletes a file, a symlink or a whole directory tree, whatever it holds. */
  async remove(sessionId: string, relPath: string): Promise<void> {
    const located = await this.locate(sessionId, relPath, true)
    const name = located.parts.at(-1)
    if (name === undefined) throw invalidPath('The workspace itself cannot be deleted')
    await this.inWorkspace(located, async (root) => {
      const parent = await openBelow(root, located.parts.slice(0, -1))
      try {
        if (!(await removeTree(parent, name))) throw notFound('File')
      } finally {
        await parent.close()
      }
    })
  }

  /**
   * The whole workspace as a zip, produced while it is read: one file is open at a time and the
   * walk waits for the zip to take it, so a slow client holds nothing more. Left out, and counted
   * in the zip's comment: symlinks, FIFOs, sockets and devices, names a zip cannot hold as they are
   * (not UTF-8, with a backslash), files larger than `maxFileBytes`. `prefix` puts the workspace
   * under a folder of the zip and `extra` adds files beside it (a session export).
   */
  archive(sessionId: string, opts: { prefix?: string; extra?: { path: string; data: Buffer }[] } = {}): Readable {
    const workspace = this.dir(sessionId)
    const prefix = opts.prefix ?? ''
    const zip = new yazl.ZipFile()
    for (const { path, data } of opts.extra ?? []) zip.addBuffer(data, path)
    const output = zip.outputStream as PassThrough
    zip.on('error', (err: Error) => output.destroy(err))
    let reading: Readable | undefined
    // A client that goes away stops the file being read, and with it the walk.
    output.once('close', () => reading?.destroy())
    const fill = async () => {
      const root = await open(workspace, DIR_FLAGS).catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return undefined
        throw err
      })
      if (!root) return zip.end()
      const omitted = new Omissions()
      // The zip path of every directory being walked, keyed by the name Buffer the walk passes back in `at`.
      const dirPaths = new Map<Buffer, string>()
      try {
        for await (const event of walk(root)) {
          if (output.destroyed) return
          if (event.kind === 'leave') dirPaths.delete(event.name)
          if (event.kind === 'unreadable') omitted.add('unreadable', event.at, event.name)
          if (event.kind !== 'entry') continue
          const { at, name, stat } = event
          if (!archivable(name, at.length === 0)) {
            omitted.add('name', at, name)
            event.skip = true
            continue
          }
          const parent = at.length === 0 ? '' : `${dirPaths.get(at.at(-1)!)}/`
          const path = `${parent}${at.length === 0 ? prefix : ''}${lossy(name)}`
          if (Buffer.byteLength(path) > 0xfffe) {
            omitted.add('long', at, name)
            event.skip = true
          } else if (stat.isDirectory()) {
            dirPaths.set(name, path)
            zip.addEmptyDirectory(path, { mtime: stat.mtime, mode: stat.mode })
          } else if (stat.isSymbolicLink()) {
            omitted.add('symlink', at, name)
          } else if (!stat.isFile()) {
            omitted.add('special', at, name)
          } else if (stat.size > this.opts.maxFileBytes) {
            omitted.add('large', at, name)
          } else {
            const opened = await openRegularIn(event.dir, name).catch((err: unknown) => {
              // Gone since it was listed: left out. Replaced by something else: left out and said.
              if (err instanceof ApiError) omitted.add('special', at, name)
              return undefined
            })
            if (!opened) continue
            if (opened.stat.size > this.opts.maxFileBytes) {
              await closeQuietly(opened.file)
              omitted.add('large', at, name)
              continue
            }
            const stream = readUpTo(opened.file, opened.stat.size)
            reading = stream
            const done = new Promise((resolve) => stream.once('close', resolve))
            zip.addReadStream(stream, path, { mtime: opened.stat.mtime, mode: opened.stat.mode })
            if (output.destroyed) stream.destroy()
            await done
          }
        }
        zip.end({ forceZip64Format: false, comment: omitted.comment() ?? '' })
      } finally {
        await root.close()
      }
    }
    fill().catch((err: Error) => output.destroy(err))
    return output
  }

  /**
   * Deletes the session's workspace and everything in it: read-only and chmod 000 directories,
   * names of any bytes, FIFOs and sockets included. Rejects, after deleting all it could, with
   * what is left; the session service logs that.
   */
  async removeWorkspace(sessionId: string): Promise<void> {
    this.dir(sessionId)
    const root = await open(this.root, DIR_FLAGS).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined
      throw err
    })
    if (!root) return
    try {
      await removeTree(root, sessionId)
    } finally {
      await root.close()
    }
  }

  private async save(root: FileHandle, parts: string[], source: Readable, owner: { uid: number; gid: number } | null): Promise<number> {
    const limits = this.limits
    const quotaOn = limits.maxBytes > 0 || limits.maxFiles > 0
    const used = quotaOn ? await measure(root, limits) : undefined
    if (used?.over) throw quotaExceeded(limits, used, limits.maxBytes > 0 && used.bytes > limits.maxBytes ? 'bytes' : 'files')
    const dirs = parts.slice(0, -1)
    const name = parts.at(-1)!
    // The temporary file goes into the deepest directory that exists; the missing ones are made
    // only once the content has fitted, so a refused upload leaves nothing behind.
    const { dir: nearest, depth } = await openDeepest(root, dirs)
    let temp: string | undefined
    try {
      const missing = dirs.length - depth
      const old = missing === 0 ? await lstat(below(nearest, name)).catch(() => undefined) : undefined
      if (old?.isDirectory()) throw invalidPath('A directory is in the way')
      let room = Number.POSITIVE_INFINITY
      if (used) {
        if (limits.maxFiles > 0 && used.files + missing + (old ? 0 : 1) > limits.maxFiles) throw quotaExceeded(limits, used, 'files')
        // The file replaced frees its blocks.
        if (limits.maxBytes > 0) room = limits.maxBytes - used.bytes + (old?.isFile() && old.nlink === 1 ? allocated(old) : 0)
      }
      temp = `.oi-upload-${randomBytes(8).toString('hex')}`
      const file = await open(below(nearest, temp), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o644)
      let size = 0
      const limit = this.opts.maxFileBytes
      const counter = new Transform({
        transform(chunk: Buffer, _encoding, callback) {
          size += chunk.length
          if (size > limit) return callback(tooLarge(limit))
          callback(size > room && used ? quotaExceeded(limits, used, 'bytes') : null, chunk)
        },
      })
      await pipeline(source, counter, file.createWriteStream())
      if (used && allocated(await lstat(below(nearest, temp))) > room) throw quotaExceeded(limits, used, 'bytes')
      const parent = missing > 0 ? await openBelow(nearest, dirs.slice(depth), owner) : nearest
      try {
        if (owner) await lchown(below(nearest, temp), owner.uid, owner.gid)
        await rename(below(nearest, temp), below(parent, name))
        temp = undefined
      } finally {
        if (parent !== nearest) await parent.close()
      }
      return size
    } finally {
      if (temp) await unlink(below(nearest, temp)).catch(() => {})
      await nearest.close()
    }
  }

  /**
   * Checks `relPath` lexically, then resolves the deepest part of it that exists: where symlinks
   * lead is decided there, once, and the walk that follows refuses any symlink it meets.
   */
  private async locate(sessionId: string, relPath: string, parentOnly = false): Promise<Located> {
    const workspace = this.dir(sessionId)
    if (typeof relPath !== 'string' || relPath.includes('\0') || isAbsolute(relPath)) throw escapes()
    const target = resolve(workspace, relPath)
    const rel = relative(workspace, target)
    if (isOutside(rel)) throw escapes()
    const lexical = rel === '' ? [] : rel.split(sep)
    const display = lexical.join('/')
    const workspaceReal = await realpath(workspace).catch(() => undefined)
    if (workspaceReal === undefined) return { target, workspaceReal: workspace, parts: lexical, display, exists: false }
    const checked = parentOnly ? lexical.slice(0, -1) : lexical
    for (let known = checked.length; known >= 0; known--) {
      const real = await realpath(join(workspace, ...checked.slice(0, known))).catch(() => undefined)
      if (real === undefined) continue
      const inside = relative(workspaceReal, real)
      if (isOutside(inside)) throw escapes()
      const parts = [...(inside === '' ? [] : inside.split(sep)), ...checked.slice(known), ...(parentOnly ? lexical.slice(-1) : [])]
      return { target, workspaceReal, parts, display, exists: known === checked.length }
    }
    throw escapes()
  }

  private async inWorkspace<T>(located: Located, action: (root: FileHandle) => Promise<T>): Promise<T> {
    const root = await open(located.workspaceReal, DIR_FLAGS).catch((err) => {
      throw fsError(err)
    })
    try {
      return await action(root)
    } catch (err) {
      throw fsError(err)
    } finally {
      await root.close()
    }
  }

  /** Creates the workspace if needed; as root, returns the owner new files must get (the kernel's user). */
  private async ensureWorkspace(sessionId: string): Promise<{ uid: number; gid: number } | null> {
    const workspace = this.dir(sessionId)
    await mkdir(this.root, { recursive: true, mode: 0o700 })
    await mkdir(workspace, { mode: 0o700 }).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw err
    })
    const stat = await lstat(workspace)
    if (!stat.isDirectory()) throw new Error(`workspace ${workspace} is not a directory`)
    return process.getuid?.() === 0 && stat.uid !== 0 ? { uid: stat.uid, gid: stat.gid } : null
  }
}
