import { randomUUID } from 'node:crypto'
import { Readable } from 'node:stream'
import yauzl from 'yauzl'
import type { LmcMessage } from '../schemas/lmc.js'
import type { Settings } from '../schemas/settings.js'
import { ApiError, invalidRequest } from './errors.js'
import type { EventBus } from './events.js'
import type { SessionService } from './sessions.js'
import type { SettingsService } from './settings.js'
import type { EventRecord, SessionRecord, Store } from './store/types.js'
import type { Workspaces } from './workspaces.js'

/** The `format` of a session export; `version` changes when its shape does. */
export const EXPORT_FORMAT = 'oi-server.session'
export const EXPORT_VERSION = 1
/** Names inside an export zip: the JSON document, and the folder holding the workspace. */
export const EXPORT_JSON = 'session.json'
export const EXPORT_WORKSPACE = 'workspace/'

/**
 * A session export (`GET /v1/sessions/{id}/export`). Kernel state (variables, imports, the
 * working directory of a shell) is not exported: an imported session starts with fresh kernels.
 */
export interface SessionExport {
  format: typeof EXPORT_FORMAT
  version: number
  exported_at: string
  session: { id: string; title: string | null; metadata: Record<string, unknown>; model: string; created_at: string }
  /** The tenant's effective settings when exported (what the session's runs used, unless a request overrode them). */
  settings: Settings
  messages: LmcMessage[]
  events: { id: number; type: string; created_at: string; data: unknown }[]
  kernel_state: 'not_exported'
}

export interface TransferDeps {
  store: Store
  bus: EventBus
  sessions: SessionService
  settings: SettingsService
  workspaces: Workspaces
  /** Largest file of a workspace; a bigger zip entry is refused (413). */
  maxFileBytes: number
}

/** Session export and import: the JSON document, or a zip with it and the workspace. */
export class TransferService {
  constructor(private readonly deps: TransferDeps) {}

  async document(tenantId: string, id: string): Promise<SessionExport> {
    const session = await this.deps.sessions.get(tenantId, id)
    const [settings, messages, events] = await Promise.all([
      this.deps.settings.get(tenantId),
      this.deps.store.allMessages(session.id),
      this.allEvents(session.id),
    ])
    return {
      format: EXPORT_FORMAT,
      version: EXPORT_VERSION,
      exported_at: new Date().toISOString(),
      session: { id: session.id, title: session.title, metadata: session.metadata, model: session.model, created_at: session.createdAt },
      settings,
      messages,
      events: events.map((e) => ({ id: e.id, type: e.type, created_at: e.createdAt, data: e.data })),
      kernel_state: 'not_exported',
    }
  }

  /** The zip: `session.json` and the workspace's files under `workspace/`, streamed. */
  async zip(tenantId: string, id: string): Promise<Readable> {
    const document = await this.document(tenantId, id)
    return this.deps.workspaces.archive(document.session.id, {
      prefix: EXPORT_WORKSPACE,
      extra: [{ path: EXPORT_JSON, data: Buffer.from(JSON.stringify(document, null, 2)) }],
    })
  }

  /**
   * A new session of `tenantId` from an export (already validated against the schema): its
   * messages, then its other events in their order (ids are renumbered; message events are
   * made again by storing the messages), then `session_imported`. Messages get new ids. Files
   * go through the workspace's own checks (paths that leave it, quota, file size). Metadata is
   * kept, with `source: "import"` and `imported_from` (the exported session's id). Anything
   * refused removes the half-made session.
   */
  async import(tenantId: string, document: SessionExport, files: ZipFiles | undefined): Promise<SessionRecord> {
    const source = document.session
    // `source` says how a session was made (this server's marker, e.g. a protocol's default session): here, by an import
    const metadata = { ...source.metadata, source: 'import', imported_from: source.id }
    const session = await this.deps.sessions.create(tenantId, { title: source.title, metadata, model: source.model })
    try {
      for (const message of document.messages) await this.deps.bus.appendMessage(session.id, { ...message, id: randomUUID() })
      for (const event of document.events) if (event.type !== 'message') await this.deps.bus.append(session.id, event.type, event.data)
      let written = 0
      if (files) {
        for await (const file of files) {
          await this.deps.workspaces.write(session.id, file.path, file.content)
          written++
        }
      }
      await this.deps.bus.append(session.id, 'session_imported', { from: source.id, exported_at: document.exported_at, files: written })
      return (await this.deps.store.getSession(tenantId, session.id)) ?? session
    } catch (err) {
      await this.deps.sessions.delete(tenantId, session.id).catch(() => {})
      throw err
    }
  }

  private async allEvents(sessionId: string): Promise<EventRecord[]> {
    const all: EventRecord[] = []
    for (;;) {
      const page = await this.deps.store.listEvents(sessionId, { startId: (all.at(-1)?.id ?? 0) + 1, limit: 500 })
      all.push(...page.events)
      if (!page.hasMore) return all
    }
  }
}

/** The workspace files of an export zip, read one at a time. */
export type ZipFiles = AsyncIterable<{ path: string; content: Readable }>

const badZip = (message: string) => invalidRequest(message, 'body', 'invalid_archive')

/**
 * Opens an export zip held in memory: returns its `session.json` parsed (not yet validated) and
 * its workspace files. Entries outside `workspace/` other than the JSON are refused; names are
 * checked again when written (services/workspaces.ts). A file whose declared size is past
 * `maxFileBytes` is refused before it is inflated, and yauzl checks the declared sizes.
 */
export async function openExportZip(buffer: Buffer, maxFileBytes: number): Promise<{ document: unknown; files: ZipFiles }> {
  const zip = await new Promise<yauzl.ZipFile>((resolve, reject) =>
    yauzl.fromBuffer(buffer, { lazyEntries: true, decodeStrings: true, validateEntrySizes: true, strictFileNames: true }, (err, z) =>
      err || !z ? reject(badZip(`Not a valid zip: ${err?.message ?? 'unreadable'}`)) : resolve(z),
    ),
  )
  const entries: yauzl.Entry[] = []
  await new Promise<void>((resolve, reject) => {
    zip.on('entry', (entry: yauzl.Entry) => {
      entries.push(entry)
      zip.readEntry()
    })
    zip.on('end', () => resolve())
    zip.on('error', (err: Error) => reject(badZip(`Not a valid zip: ${err.message}`)))
    zip.readEntry()
  })
  const read = (entry: yauzl.Entry) =>
    new Promise<Readable>((resolve, reject) =>
      zip.openReadStream(entry, (err, stream) => (err || !stream ? reject(badZip(`Unreadable entry ${entry.fileName}`)) : resolve(stream))),
    )
  const json = entries.find((e) => e.fileName === EXPORT_JSON)
  if (!json) throw badZip(`The zip has no ${EXPORT_JSON}`)
  let text = ''
  for await (const chunk of await read(json)) text += chunk
  let document: unknown
  try {
    document = JSON.parse(text)
  } catch {
    throw badZip(`${EXPORT_JSON} is not JSON`)
  }
  const files: yauzl.Entry[] = []
  for (const entry of entries) {
    if (entry === json || entry.fileName === EXPORT_WORKSPACE) continue
    if (!entry.fileName.startsWith(EXPORT_WORKSPACE)) throw badZip(`Unexpected entry ${entry.fileName}: files go under ${EXPORT_WORKSPACE}`)
    if (entry.fileName.endsWith('/')) continue
    // Unix mode in the high bits: only regular files are restored (a symlink entry would be written as a file holding its target).
    const mode = (entry.externalFileAttributes >>> 16) & 0o170000
    if (mode !== 0 && mode !== 0o100000) throw badZip(`${entry.fileName} is not a regular file`)
    if (entry.uncompressedSize > maxFileBytes) throw new ApiError(413, 'validation_error', 'payload_too_large', `${entry.fileName} is larger than ${maxFileBytes} bytes`)
    files.push(entry)
  }
  return {
    document,
    files: (async function* () {
      for (const entry of files) yield { path: entry.fileName.slice(EXPORT_WORKSPACE.length), content: await read(entry) }
    })(),
  }
}
