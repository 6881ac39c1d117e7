import { randomBytes } from 'node:crypto'
import { constants as fsConstants } from 'node:fs'
import { type FileHandle, lchown, lstat, mkdir, open, readdir, realpath, rename, rmdir, unlink } from 'node:fs/promises'
import { isAbsolute, join, posix, relative, resolve, sep } from 'node:path'
import { PassThrough, type Readable, Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import yazl from 'yazl'
import { ApiError, invalidRequest, notFound } from './errors.js'

export interface WorkspaceEntry {
  name: string
  path: string
  type: 'file' | 'directory' | 'symlink'
  size: number
  modified_at: string
}

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_DIRECTORY, O_NOFOLLOW } = fsConstants
const DIR_FLAGS = O_RDONLY | O_DIRECTORY | O_NOFOLLOW
const SESSION_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/

/**
 * Every operation below walks from an open descriptor of the workspace, one component at a time,
 * through `/proc/self/fd/N/name` with O_NOFOLLOW. Kernel code runs concurrently and may swap a
 * directory for a symlink at any moment; a check on paths followed by a second lookup would let
 * it redirect this (root) process outside the workspace.
 */
const below = (dir: FileHandle, name?: string) => (name === undefined ? `/proc/self/fd/${dir.fd}` : `/proc/self/fd/${dir.fd}/${name}`)

const escapes = () => invalidRequest('Path escapes the workspace', 'path', 'invalid_path')
const invalidPath = (message: string) => invalidRequest(message, 'path', 'invalid_path')
const tooLarge = (limit: number) => new ApiError(413, 'validation_error', 'payload_too_large', `The file is larger than ${limit} bytes`, 'body')

function fsError(err: unknown): unknown {
  const code = (err as NodeJS.ErrnoException).code
  if (code === 'ENOENT') return notFound('File')
  // A symlink or a file where the walk needed a real directory: refused, never followed.
  if (code === 'ELOOP' || code === 'ENOTDIR') return escapes()
  if (code === 'EISDIR' || code === 'ENOTEMPTY' || code === 'EEXIST') return invalidPath('A directory is in the way')
  return err
}

async function closeQuietly(handle: FileHandle | undefined): Promise<void> {
  await handle?.close().catch(() => {})
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

/** Deletes `name` in `dir`, recursing through descriptors so no symlink is ever followed. */
async function removeBelow(dir: FileHandle, name: string): Promise<void> {
  const stat = await lstat(below(dir, name))
  if (!stat.isDirectory()) return unlink(below(dir, name))
  const child = await open(below(dir, name), DIR_FLAGS)
  try {
    for (const entry of await readdir(below(child))) await removeBelow(child, entry)
  } finally {
    await child.close()
  }
  await rmdir(below(dir, name))
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

  constructor(
    rootDir: string,
    private readonly opts: { maxFileBytes: number },
  ) {
    this.root = resolve(rootDir)
  }

  dir(sessionId: string): string {
    if (!SESSION_ID.test(sessionId)) throw invalidRequest('Invalid session id', 'session_id')
    return join(this.root, sessionId)
  }

  /**
   * The absolute path of `relPath` in the session's workspace. Throws 400 invalid_path for `..`
   * escapes, absolute paths, NUL bytes and symlinks that lead outside the workspace.
   */
  async resolve(sessionId: string, relPath: string): Promise<string> {
    return (await this.locate(sessionId, relPath)).target
  }

  async list(sessionId: string, relPath = ''): Promise<WorkspaceEntry[]> {
    const located = await this.locate(sessionId, relPath)
    if (!located.exists) {
      if (located.parts.length === 0) return []
      throw notFound('Directory')
    }
    return this.inWorkspace(located, async (root) => {
      const dir = await openBelow(root, located.parts)
      try {
        const entries: WorkspaceEntry[] = []
        for (const name of (await readdir(below(dir))).sort()) {
          const stat = await lstat(below(dir, name)).catch(() => undefined)
          if (!stat) continue
          entries.push({
            name,
            path: posix.join(located.display, name),
            type: stat.isSymbolicLink() ? 'symlink' : stat.isDirectory() ? 'directory' : 'file',
            size: stat.isDirectory() ? 0 : stat.size,
            modified_at: stat.mtime.toISOString(),
          })
        }
        return entries
      } finally {
        await dir.close()
      }
    })
  }

  async readStream(sessionId: string, relPath: string): Promise<Readable> {
    const located = await this.locate(sessionId, relPath)
    const name = located.parts.at(-1)
    if (name === undefined) throw invalidPath('The path is a directory')
    if (!located.exists) throw notFound('File')
    return this.inWorkspace(located, async (root) => {
      const parent = await openBelow(root, located.parts.slice(0, -1))
      let file: FileHandle | undefined
      try {
        file = await open(below(parent, name), O_RDONLY | O_NOFOLLOW)
        const stat = await file.stat()
        if (stat.isDirectory()) throw invalidPath('The path is a directory')
        if (!stat.isFile()) throw invalidPath('The path is not a regular file')
        return file.createReadStream()
      } catch (err) {
        await closeQuietly(file)
        throw err
      } finally {
        await parent.close()
      }
    })
  }

  /**
   * Streams `source` into the file at `relPath` (parents are created) and returns its size. The
   * bytes go to a temporary file renamed over the target at the end, so readers never see half a
   * file and a symlink at the target is replaced, never followed.
   */
  async write(sessionId: string, relPath: string, source: Readable): Promise<number> {
    const owner = await this.ensureWorkspace(sessionId)
    const located = await this.locate(sessionId, relPath, true)
    const name = located.parts.at(-1)
    if (name === undefined) throw invalidPath('A file path is required')
    return this.inWorkspace(located, async (root) => {
      const parent = await openBelow(root, located.parts.slice(0, -1), owner)
      let temp: string | undefined = `.oi-upload-${randomBytes(8).toString('hex')}`
      try {
        const file = await open(below(parent, temp), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o644)
        let size = 0
        const limit = this.opts.maxFileBytes
        const counter = new Transform({
          transform(chunk: Buffer, _encoding, callback) {
            size += chunk.length
            callback(size > limit ? tooLarge(limit) : null, chunk)
          },
        })
        await pipeline(source, counter, file.createWriteStream())
        if (owner) await lchown(below(parent, temp), owner.uid, owner.gid)
        await rename(below(parent, temp), below(parent, name))
        temp = undefined
        return size
      } finally {
        if (temp) await unlink(below(parent, temp)).catch(() => {})
        await parent.close()
      }
    })
  }

  /** Deletes a file, a symlink or a whole directory tree. */
  async remove(sessionId: string, relPath: string): Promise<void> {
    const located = await this.locate(sessionId, relPath, true)
    const name = located.parts.at(-1)
    if (name === undefined) throw invalidPath('The workspace itself cannot be deleted')
    await this.inWorkspace(located, async (root) => {
      const parent = await openBelow(root, located.parts.slice(0, -1))
      try {
        await removeBelow(parent, name)
      } finally {
        await parent.close()
      }
    })
  }

  /** The whole workspace as a zip (symlinks left out), produced while it is read. */
  archive(sessionId: string): Readable {
    const workspace = this.dir(sessionId)
    const zip = new yazl.ZipFile()
    const output = zip.outputStream as PassThrough
    zip.on('error', (err: Error) => output.destroy(err))
    const fill = async () => {
      const root = await open(workspace, DIR_FLAGS).catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return undefined
        throw err
      })
      if (!root) return zip.end()
      const release = () => void root.close().catch(() => {})
      output.once('close', release)
      output.once('end', release)
      const walk = async (parts: string[]): Promise<void> => {
        const dir = await openBelow(root, parts)
        try {
          for (const name of (await readdir(below(dir))).sort()) {
            const stat = await lstat(below(dir, name)).catch(() => undefined)
            const path = [...parts, name]
            if (stat?.isDirectory()) {
              zip.addEmptyDirectory(path.join('/'), { mtime: stat.mtime, mode: stat.mode })
              await walk(path)
            } else if (stat?.isFile()) {
              zip.addReadStreamLazy(path.join('/'), { mtime: stat.mtime, mode: stat.mode }, (callback) => {
                void openArchived(root, path).then((stream) => callback(null, stream))
              })
            }
          }
        } finally {
          await dir.close()
        }
      }
      await walk([])
      zip.end()
    }
    fill().catch((err: Error) => output.destroy(err))
    return output
  }

  async removeWorkspace(sessionId: string): Promise<void> {
    this.dir(sessionId)
    const root = await open(this.root, DIR_FLAGS).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined
      throw err
    })
    if (!root) return
    try {
      await removeBelow(root, sessionId).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') throw err
      })
    } finally {
      await root.close()
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

async function openArchived(root: FileHandle, parts: string[]): Promise<Readable> {
  let dir: FileHandle | undefined
  try {
    dir = await openBelow(root, parts.slice(0, -1))
    const file = await open(below(dir, parts.at(-1)), O_RDONLY | O_NOFOLLOW)
    return file.createReadStream()
  } catch {
    // Gone or replaced since the listing: an empty entry keeps the archive consistent.
    const empty = new PassThrough()
    empty.end()
    return empty
  } finally {
    await closeQuietly(dir)
  }
}
