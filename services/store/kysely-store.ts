import { randomBytes } from 'node:crypto'
import { type Dialect, Kysely, type Selectable, sql } from 'kysely'
import type { LmcMessage } from '../../schemas/lmc.js'
import { invalidRequest, sessionMoved, sessionNotFound } from '../errors.js'
import { type Engine, migrate } from './migrations.js'
import { compile, type Plan, type Runner, type Statement } from './statements.js'
import type { ApiKeyRecord, AppendEntry, EventRecord, Page, ResponseRecord, SecretRecord, SessionRecord, Store, SuspendedTurnRecord } from './types.js'

interface SessionsTable {
  id: string
  tenant_id: string
  title: string | null
  metadata: string
  model: string
  created_at: string
  updated_at: string
  message_count: number
  message_seq: number
  event_seq: number
  /** The highest lease generation that wrote for the session (services/cluster/leases.ts). */
  owner_fence: number
}

interface MessagesTable {
  session_id: string
  seq: number
  id: string
  role: LmcMessage['role']
  type: LmcMessage['type']
  format: LmcMessage['format'] | null
  stream: LmcMessage['stream'] | null
  recipient: LmcMessage['recipient'] | null
  content: string
  /** 1 when `content` holds JSON rather than the literal string. */
  content_json: number
  created_at: string
}

interface EventsTable {
  session_id: string
  id: number
  type: string
  data: string
  created_at: string
}

interface ApiKeysTable {
  id: string
  name: string
  prefix: string
  hash: string
  created_at: string
  expires_at: string | null
  last_used_at: string | null
}

interface SettingsTable {
  tenant_id: string
  data: string
  updated_at: string
}

interface SecretsTable {
  tenant_id: string
  name: string
  ciphertext: string
  created_at: string
  updated_at: string
}

interface SuspendedTurnsTable {
  session_id: string
  id: string
  reason: SuspendedTurnRecord['reason']
  state: string
  created_at: string
}

interface ResponsesTable {
  id: string
  tenant_id: string
  session_id: string
  previous_response_id: string | null
  status: string
  created_at: string
  response: string
  input: string
  messages: string
}

interface ResponseItemsTable {
  tenant_id: string
  id: string
  response_id: string
  item: string
}

export interface Database {
  suspended_turns: SuspendedTurnsTable
  sessions: SessionsTable
  messages: MessagesTable
  events: EventsTable
  api_keys: ApiKeysTable
  settings: SettingsTable
  secrets: SecretsTable
  responses: ResponsesTable
  response_items: ResponseItemsTable
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i
const ISO_TIMESTAMP = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/

/**
 * Ids come straight from URLs. Anything that is not a UUID cannot name a row, and refusing it
 * here keeps strings PostgreSQL would reject (a NUL byte) away from the database.
 */
function uuidOrUndefined(id: string): string | undefined {
  return UUID.test(id) ? id.toLowerCase() : undefined
}

const RESPONSE_ID = /^resp_[0-9a-f]{48}$/

/** Response ids are ours (`resp_` + 48 hex digits); anything else names no row. */
function responseIdOrUndefined(id: string): string | undefined {
  return RESPONSE_ID.test(id) ? id : undefined
}

/** Output item ids as the server makes them (`msg_…`, `ci_…`, `fc_…`): nothing else names a stored item. */
const ITEM_ID = /^[a-z]{2,4}_[0-9a-f]{32,48}$/

/** A chain of `previous_response_id` links is walked at most this deep. */
const MAX_RESPONSE_CHAIN = 10_000

/** `toISOString()` is fixed-width, so text order is time order on both engines. */
const now = () => new Date().toISOString()

let lastMs = 0
let counter = 0
/**
 * UUIDv7 (RFC 9562) with a 12-bit counter within the millisecond: session ids sort in creation
 * order, so "newest first" by (created_at, id) is exact even for sessions made in the same
 * millisecond, without bending timestamps away from the clock.
 */
function uuidv7(): string {
  const ms = Date.now()
  if (ms > lastMs) {
    lastMs = ms
    counter = randomBytes(2).readUInt16BE() & 0x1ff
  } else if (++counter > 0xfff) {
    // more than 4096 in one millisecond: borrow the next one so order still holds
    lastMs++
    counter = 0
  }
  const bytes = randomBytes(16)
  bytes.writeUIntBE(lastMs, 0, 6)
  bytes[6] = 0x70 | (counter >> 8)
  bytes[7] = counter & 0xff
  bytes[8] = 0x80 | (bytes[8]! & 0x3f)
  const hex = bytes.toString('hex')
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`
}

function encodeCursor(row: { created_at: string; id: string }): string {
  return Buffer.from(JSON.stringify([row.created_at, row.id])).toString('base64url')
}

function decodeCursor(cursor: string): { createdAt: string; id: string } {
  let parsed: unknown
  try {
    parsed = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'))
  } catch {
    throw invalidRequest('Invalid cursor', 'cursor')
  }
  if (
    !Array.isArray(parsed) ||
    parsed.length !== 2 ||
    typeof parsed[0] !== 'string' ||
    typeof parsed[1] !== 'string' ||
    !ISO_TIMESTAMP.test(parsed[0]) ||
    !UUID.test(parsed[1])
  ) {
    throw invalidRequest('Invalid cursor', 'cursor')
  }
  return { createdAt: parsed[0], id: parsed[1] }
}

function toResponse(row: Selectable<ResponsesTable>): ResponseRecord {
  return {
    id: row.id,
    tenantId: row.tenant_id,
    sessionId: row.session_id,
    previousResponseId: row.previous_response_id,
    status: row.status,
    createdAt: row.created_at,
    response: JSON.parse(row.response) as Record<string, unknown>,
    input: JSON.parse(row.input) as Record<string, unknown>[],
    messages: JSON.parse(row.messages) as LmcMessage[],
  }
}

function toSession(row: Selectable<SessionsTable>): SessionRecord {
  return {
    id: row.id,
    tenantId: row.tenant_id,
    title: row.title,
    metadata: JSON.parse(row.metadata) as Record<string, unknown>,
    model: row.model,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    messageCount: row.message_count,
  }
}

/**
 * Objects (confirmation requests) are stored as JSON. So are strings holding NUL, which
 * PostgreSQL text cannot store but which console output can contain; JSON escapes it.
 */
function encodeContent(content: LmcMessage['content']): { content: string; content_json: number } {
  if (typeof content === 'string' && !content.includes('\u0000')) return { content, content_json: 0 }
  return { content: JSON.stringify(content), content_json: 1 }
}

function toMessage(row: Selectable<MessagesTable>): LmcMessage {
  return {
    id: row.id,
    role: row.role,
    type: row.type,
    ...(row.format !== null && { format: row.format }),
    ...(row.recipient !== null && { recipient: row.recipient }),
    ...(row.stream !== null && { stream: row.stream }),
    content: row.content_json ? (JSON.parse(row.content) as LmcMessage['content']) : row.content,
    created_at: row.created_at,
  }
}

function toEvent(row: Selectable<EventsTable>): EventRecord {
  return { id: row.id, type: row.type, createdAt: row.created_at, data: JSON.parse(row.data) }
}

function toSuspendedTurn(row: Selectable<SuspendedTurnsTable>): SuspendedTurnRecord {
  return { id: row.id, sessionId: row.session_id, reason: row.reason, state: JSON.parse(row.state), createdAt: row.created_at }
}

function toApiKey(row: Selectable<ApiKeysTable>): ApiKeyRecord {
  return {
    id: row.id,
    name: row.name,
    prefix: row.prefix,
    hash: row.hash,
    createdAt: row.created_at,
    expiresAt: row.expires_at,
    lastUsedAt: row.last_used_at,
  }
}

/**
 * The store for both engines. Everything here is portable SQL (RETURNING, ON CONFLICT and row
 * values exist in SQLite ≥ 3.35 and PostgreSQL); what differs lives in the dialect passed in and
 * in the column types chosen by the migration.
 */
export class KyselyStore implements Store {
  readonly #db: Kysely<Database>
  readonly #runner: Runner
  readonly #sql: ReturnType<typeof statements>

  /**
   * `runner` runs the compiled statements of the hot path (statements.ts) on the same database
   * as `dialect`; everything else goes through Kysely's builder.
   */
  constructor(
    readonly engine: Engine,
    dialect: Dialect,
    runner: Runner,
  ) {
    this.#db = new Kysely<Database>({ dialect })
    this.#runner = runner
    this.#sql = statements(this.#db)
  }

  async migrate(): Promise<void> {
    await migrate(this.#db, this.engine)
  }

  async ping(): Promise<void> {
    await sql`select 1`.execute(this.#db)
  }

  async close(): Promise<void> {
    await this.#db.destroy()
  }

  async createSession(input: {
    tenantId: string
    title?: string | null
    metadata?: Record<string, unknown>
    model: string
  }): Promise<SessionRecord> {
    const at = now()
    const row = {
      id: uuidv7(),
      tenant_id: input.tenantId,
      title: input.title ?? null,
      metadata: JSON.stringify(input.metadata ?? {}),
      model: input.model,
      created_at: at,
      updated_at: at,
      message_count: 0,
      message_seq: 0,
      event_seq: 0,
      owner_fence: 0,
    }
    await this.#runner.run(this.#sql.insertSession, row)
    return toSession(row)
  }

  async getSession(tenantId: string, id: string): Promise<SessionRecord | undefined> {
    const sessionId = uuidOrUndefined(id)
    if (!sessionId) return undefined
    const [row] = await this.#runner.run(this.#sql.getSession, { id: sessionId, tenant_id: tenantId })
    return row && toSession(row as Selectable<SessionsTable>)
  }

  async listSessions(tenantId: string, opts: { limit: number; cursor?: string }): Promise<Page<SessionRecord>> {
    const after = opts.cursor === undefined ? undefined : decodeCursor(opts.cursor)
    let query = this.#db.selectFrom('sessions').selectAll().where('tenant_id', '=', tenantId)
    if (after) {
      // Keyset on (created_at, id): sessions created meanwhile sort before the cursor, so the
      // remaining pages neither skip nor repeat rows.
      query = query.where(({ eb, refTuple, tuple }) =>
        eb(refTuple('created_at', 'id'), '<', tuple(after.createdAt, after.id)),
      )
    }
    const rows = await query
      .orderBy('created_at', 'desc')
      .orderBy('id', 'desc')
      .limit(opts.limit + 1)
      .execute()
    const hasMore = rows.length > opts.limit
    const page = rows.slice(0, opts.limit)
    const last = page.at(-1)
    return { items: page.map(toSession), nextCursor: hasMore && last ? encodeCursor(last) : null }
  }

  async updateSession(
    tenantId: string,
    id: string,
    patch: { title?: string | null; metadata?: Record<string, unknown> },
  ): Promise<SessionRecord | undefined> {
    const sessionId = uuidOrUndefined(id)
    if (!sessionId) return undefined
    const row = await this.#db
      .updateTable('sessions')
      .set({
        updated_at: now(),
        ...(patch.title !== undefined && { title: patch.title }),
        ...(patch.metadata !== undefined && { metadata: JSON.stringify(patch.metadata) }),
      })
      .where('id', '=', sessionId)
      .where('tenant_id', '=', tenantId)
      .returningAll()
      .executeTakeFirst()
    return row && toSession(row)
  }

  async deleteSession(tenantId: string, id: string): Promise<boolean> {
    const sessionId = uuidOrUndefined(id)
    if (!sessionId) return false
    const q = this.#sql
    return this.#runner.transaction(function* (): Plan<boolean> {
      // A no-op update takes the row lock first (SQLite has no SELECT … FOR UPDATE): an append
      // racing with the delete either commits before it or finds no session, never leaves orphans.
      const [locked] = yield { statement: q.lockSession, values: { id: sessionId, tenant_id: tenantId } }
      if (!locked) return false
      yield { statement: q.deleteMessages, values: { session_id: sessionId } }
      yield { statement: q.deleteEvents, values: { session_id: sessionId } }
      yield { statement: q.deleteSuspendedTurns, values: { session_id: sessionId } }
      yield { statement: q.deleteSessionResponseItems, values: { session_id: sessionId } }
      yield { statement: q.deleteSessionResponses, values: { session_id: sessionId } }
      yield { statement: q.deleteSession, values: { id: sessionId } }
      return true
    })
  }

  async listIdleSessions(before: string, limit: number): Promise<{ id: string; tenantId: string }[]> {
    const rows = await this.#db
      .selectFrom('sessions')
      .select(['id', 'tenant_id'])
      .where('updated_at', '<', before)
      .orderBy('updated_at')
      .limit(limit)
      .execute()
    return rows.map((row) => ({ id: row.id, tenantId: row.tenant_id }))
  }

  async appendMessage(sessionId: string, message: LmcMessage, fence?: number): Promise<EventRecord> {
    return (await this.appendEntries(sessionId, [{ message }], fence))[0]!
  }

  async appendEntries(sessionId: string, entries: AppendEntry[], fence?: number): Promise<EventRecord[]> {
    const id = uuidOrUndefined(sessionId)
    if (!id) throw sessionNotFound()
    if (entries.length === 0) return []
    const q = this.#sql
    const messages = entries.filter((e) => 'message' in e).length
    return this.#runner.transaction(function* (): Plan<EventRecord[]> {
      const at = now()
      // The increment is the lock: on PostgreSQL it holds the session row until commit, SQLite
      // has a single writer, so concurrent replicas cannot hand out the same sequence number.
      // With a fence, the bump is also the check: a newer owner's fence leaves no row to bump.
      const [seqs] =
        fence === undefined
          ? yield { statement: q.bumpSession, values: { id, messages, events: entries.length, at } }
          : yield { statement: q.bumpSessionFenced, values: { id, messages, events: entries.length, at, fence } }
      if (!seqs) {
        if (fence === undefined) throw sessionNotFound()
        const [exists] = yield { statement: q.sessionExists, values: { id } }
        throw exists ? sessionMoved() : sessionNotFound()
      }
      let messageSeq = Number(seqs.message_seq) - messages
      let eventSeq = Number(seqs.event_seq) - entries.length
      const events: EventRecord[] = []
      for (const entry of entries) {
        let type: string
        let data: unknown
        if ('message' in entry) {
          const message = entry.message
          yield {
            statement: q.insertMessage,
            values: {
              session_id: id,
              seq: ++messageSeq,
              id: message.id,
              role: message.role,
              type: message.type,
              format: message.format ?? null,
              stream: message.stream ?? null,
              recipient: message.recipient ?? null,
              ...encodeContent(message.content),
              created_at: message.created_at,
            },
          }
          type = 'message'
          data = message
        } else {
          type = entry.type
          data = entry.data
        }
        const row = { session_id: id, id: ++eventSeq, type, data: JSON.stringify(data ?? null), created_at: at }
        yield { statement: q.insertEvent, values: row }
        events.push(toEvent(row))
      }
      return events
    })
  }

  async listMessages(
    sessionId: string,
    opts: { after?: string; limit: number },
  ): Promise<{ messages: LmcMessage[]; hasMore: boolean }> {
    const id = uuidOrUndefined(sessionId)
    if (!id) return { messages: [], hasMore: false }
    let afterSeq = 0
    if (opts.after !== undefined) {
      const afterId = uuidOrUndefined(opts.after)
      // Ids are unique in practice; should one repeat, its latest copy is the position.
      const anchor =
        afterId &&
        (await this.#db
          .selectFrom('messages')
          .select('seq')
          .where('session_id', '=', id)
          .where('id', '=', afterId)
          .orderBy('seq', 'desc')
          .limit(1)
          .executeTakeFirst())
      if (!anchor) throw invalidRequest('Unknown message id in after', 'after')
      afterSeq = anchor.seq
    }
    const rows = await this.#db
      .selectFrom('messages')
      .selectAll()
      .where('session_id', '=', id)
      .where('seq', '>', afterSeq)
      .orderBy('seq')
      .limit(opts.limit + 1)
      .execute()
    return { messages: rows.slice(0, opts.limit).map(toMessage), hasMore: rows.length > opts.limit }
  }

  async allMessages(sessionId: string): Promise<LmcMessage[]> {
    const id = uuidOrUndefined(sessionId)
    if (!id) return []
    const rows = await this.#runner.run(this.#sql.allMessages, { session_id: id })
    return (rows as Selectable<MessagesTable>[]).map(toMessage)
  }

  async clearMessages(sessionId: string): Promise<void> {
    const id = uuidOrUndefined(sessionId)
    if (!id) return
    const q = this.#sql
    await this.#runner.transaction(function* (): Plan<void> {
      const [session] = yield { statement: q.clearSession, values: { id, at: now() } }
      if (session) yield { statement: q.deleteMessages, values: { session_id: id } }
    })
  }

  async appendEvent(sessionId: string, type: string, data: unknown, fence?: number): Promise<EventRecord> {
    // Any event is activity (appendEntries bumps updated_at): a session used only through
    // /execute must not be swept as idle.
    return (await this.appendEntries(sessionId, [{ type, data }], fence))[0]!
  }

  async fenceSession(sessionId: string, fence: number): Promise<void> {
    const id = uuidOrUndefined(sessionId)
    if (!id) return
    await this.#db.updateTable('sessions').set({ owner_fence: fence }).where('id', '=', id).where('owner_fence', '<', fence).execute()
  }

  async listEvents(
    sessionId: string,
    opts: { startId?: number; endId?: number; reverse?: boolean; limit: number },
  ): Promise<{ events: EventRecord[]; hasMore: boolean }> {
    const id = uuidOrUndefined(sessionId)
    if (!id) return { events: [], hasMore: false }
    let query = this.#db.selectFrom('events').selectAll().where('session_id', '=', id)
    if (opts.reverse) {
      if (opts.startId !== undefined) query = query.where('id', '<=', opts.startId)
      if (opts.endId !== undefined) query = query.where('id', '>=', opts.endId)
    } else {
      query = query.where('id', '>=', opts.startId ?? 1)
      if (opts.endId !== undefined) query = query.where('id', '<=', opts.endId)
    }
    const rows = await query
      .orderBy('id', opts.reverse ? 'desc' : 'asc')
      .limit(opts.limit + 1)
      .execute()
    return { events: rows.slice(0, opts.limit).map(toEvent), hasMore: rows.length > opts.limit }
  }

  async putSuspendedTurn(turn: Omit<SuspendedTurnRecord, 'createdAt'>): Promise<SuspendedTurnRecord> {
    const sessionId = uuidOrUndefined(turn.sessionId)
    if (!sessionId) throw sessionNotFound()
    const row = { session_id: sessionId, id: turn.id, reason: turn.reason, state: JSON.stringify(turn.state ?? null), created_at: now() }
    const q = this.#sql
    return this.#runner.transaction(function* (): Plan<SuspendedTurnRecord> {
      // Taking the session row first orders this after a concurrent delete, as appends do.
      const [session] = yield { statement: q.touchSession, values: { id: sessionId, at: row.created_at } }
      if (!session) throw sessionNotFound()
      yield { statement: q.putSuspendedTurn, values: row }
      return toSuspendedTurn(row)
    })
  }

  async getSuspendedTurn(sessionId: string): Promise<SuspendedTurnRecord | undefined> {
    const id = uuidOrUndefined(sessionId)
    if (!id) return undefined
    const [row] = await this.#runner.run(this.#sql.getSuspendedTurn, { session_id: id })
    return row && toSuspendedTurn(row as Selectable<SuspendedTurnsTable>)
  }

  async claimSuspendedTurn(sessionId: string, id: string): Promise<boolean> {
    const session = uuidOrUndefined(sessionId)
    if (!session) return false
    return (await this.#runner.run(this.#sql.claimSuspendedTurn, { session_id: session, id })).length > 0
  }

  async createApiKey(key: ApiKeyRecord): Promise<void> {
    await this.#db
      .insertInto('api_keys')
      .values({
        id: key.id,
        name: key.name,
        prefix: key.prefix,
        hash: key.hash,
        created_at: key.createdAt,
        expires_at: key.expiresAt,
        last_used_at: key.lastUsedAt,
      })
      .execute()
  }

  async findApiKeyByHash(hash: string): Promise<ApiKeyRecord | undefined> {
    const [row] = await this.#runner.run(this.#sql.findApiKey, { hash })
    return row && toApiKey(row as Selectable<ApiKeysTable>)
  }

  async listApiKeys(): Promise<ApiKeyRecord[]> {
    const rows = await this.#db.selectFrom('api_keys').selectAll().orderBy('created_at').orderBy('id').execute()
    return rows.map(toApiKey)
  }

  async deleteApiKey(id: string): Promise<boolean> {
    const result = await this.#db.deleteFrom('api_keys').where('id', '=', id).executeTakeFirst()
    return result.numDeletedRows > 0n
  }

  async markApiKeysUsed(used: { id: string; at: string }[]): Promise<void> {
    const latest = new Map<string, string>()
    for (const { id, at } of used) {
      const seen = latest.get(id)
      if (seen === undefined || at > seen) latest.set(id, at)
    }
    if (latest.size === 0) return
    const q = this.#sql
    await this.#runner.transaction(function* (): Plan<void> {
      // Replicas flush independently; an older batch must not move last_used_at backwards.
      for (const [id, at] of latest) yield { statement: q.markKeyUsed, values: { id, at } }
    })
  }

  async createResponse(record: ResponseRecord): Promise<void> {
    await this.#db
      .insertInto('responses')
      .values({
        id: record.id,
        tenant_id: record.tenantId,
        session_id: record.sessionId,
        previous_response_id: record.previousResponseId,
        status: record.status,
        created_at: record.createdAt,
        response: JSON.stringify(record.response),
        input: JSON.stringify(record.input),
        messages: JSON.stringify(record.messages),
      })
      .execute()
  }

  async getResponse(tenantId: string, id: string): Promise<ResponseRecord | undefined> {
    const responseId = responseIdOrUndefined(id)
    if (!responseId) return undefined
    const row = await this.#db
      .selectFrom('responses')
      .selectAll()
      .where('id', '=', responseId)
      .where('tenant_id', '=', tenantId)
      .executeTakeFirst()
    return row && toResponse(row)
  }

  async updateResponse(
    tenantId: string,
    id: string,
    patch: Pick<ResponseRecord, 'status' | 'response' | 'messages'>,
  ): Promise<boolean> {
    const responseId = responseIdOrUndefined(id)
    if (!responseId) return false
    const output = Array.isArray(patch.response.output) ? (patch.response.output as Record<string, unknown>[]) : []
    const items = output
      .filter((item) => typeof item?.id === 'string' && item.id)
      .map((item) => ({ tenant_id: tenantId, id: item.id as string, response_id: responseId, item: JSON.stringify(item) }))
    const q = this.#sql
    const values = { id: responseId, tenant_id: tenantId, status: patch.status, response: JSON.stringify(patch.response), messages: JSON.stringify(patch.messages) }
    return this.#runner.transaction(function* (): Plan<boolean> {
      const [updated] = yield { statement: q.updateResponse, values }
      if (!updated) return false
      for (const item of items) yield { statement: q.putResponseItem, values: item }
      return true
    })
  }

  async getResponseItems(tenantId: string, ids: string[]): Promise<Map<string, Record<string, unknown>>> {
    const found = new Map<string, Record<string, unknown>>()
    const wanted = ids.filter((id) => ITEM_ID.test(id))
    if (wanted.length === 0) return found
    const rows = await this.#db.selectFrom('response_items').select(['id', 'item']).where('tenant_id', '=', tenantId).where('id', 'in', wanted).execute()
    for (const row of rows) found.set(row.id, JSON.parse(row.item) as Record<string, unknown>)
    return found
  }

  async deleteResponse(tenantId: string, id: string): Promise<boolean> {
    const responseId = responseIdOrUndefined(id)
    if (!responseId) return false
    const q = this.#sql
    return this.#runner.transaction(function* (): Plan<boolean> {
      yield { statement: q.deleteResponseItems, values: { response_id: responseId, tenant_id: tenantId } }
      const [deleted] = yield { statement: q.deleteResponse, values: { id: responseId, tenant_id: tenantId } }
      return Boolean(deleted)
    })
  }

  async responseContext(tenantId: string, id: string): Promise<LmcMessage[] | undefined> {
    const responseId = responseIdOrUndefined(id)
    if (!responseId) return undefined
    // One round trip for the whole chain, however long, on both engines.
    const { rows } = await sql<{ messages: string }>`
      with recursive chain(id, previous_response_id, messages, depth) as (
        select id, previous_response_id, messages, 0 from responses where id = ${responseId} and tenant_id = ${tenantId}
        union all
        select r.id, r.previous_response_id, r.messages, chain.depth + 1
        from responses r join chain on r.id = chain.previous_response_id
        where r.tenant_id = ${tenantId} and chain.depth < ${MAX_RESPONSE_CHAIN}
      )
      select messages from chain order by depth desc`.execute(this.#db)
    if (rows.length === 0) return undefined
    return rows.flatMap((row) => JSON.parse(row.messages) as LmcMessage[])
  }

  async getSettings(tenantId: string): Promise<Record<string, unknown>> {
    const [row] = await this.#runner.run(this.#sql.getSettings, { tenant_id: tenantId })
    return row ? (JSON.parse(row.data as string) as Record<string, unknown>) : {}
  }

  async putSettings(tenantId: string, settings: Record<string, unknown>): Promise<void> {
    const row = { tenant_id: tenantId, data: JSON.stringify(settings), updated_at: now() }
    await this.#db
      .insertInto('settings')
      .values(row)
      .onConflict((oc) => oc.column('tenant_id').doUpdateSet({ data: row.data, updated_at: row.updated_at }))
      .execute()
  }

  async listSecrets(tenantId: string): Promise<SecretRecord[]> {
    const rows = await this.#db
      .selectFrom('secrets')
      .select(['name', 'ciphertext', 'created_at', 'updated_at'])
      .where('tenant_id', '=', tenantId)
      .orderBy('name')
      .execute()
    return rows.map((row) => ({
      name: row.name,
      ciphertext: row.ciphertext,
      createdAt: row.created_at,
      updatedAt: row.updated_at,
    }))
  }

  async putSecret(tenantId: string, name: string, ciphertext: string): Promise<void> {
    const at = now()
    await this.#db
      .insertInto('secrets')
      .values({ tenant_id: tenantId, name, ciphertext, created_at: at, updated_at: at })
      .onConflict((oc) => oc.columns(['tenant_id', 'name']).doUpdateSet({ ciphertext, updated_at: at }))
      .execute()
  }

  async deleteSecret(tenantId: string, name: string): Promise<boolean> {
    const result = await this.#db
      .deleteFrom('secrets')
      .where('tenant_id', '=', tenantId)
      .where('name', '=', name)
      .executeTakeFirst()
    return result.numDeletedRows > 0n
  }
}

/**
 * The statements of the hot path and of every transaction, compiled once per store for its
 * engine (see statements.ts). Names are unique: PostgreSQL prepares each once per connection.
 */
function statements(db: Kysely<Database>) {
  return {
    insertSession: compile('oi_insert_session', (p) =>
      db.insertInto('sessions').values({
        id: p('id'),
        tenant_id: p('tenant_id'),
        title: p('title'),
        metadata: p('metadata'),
        model: p('model'),
        created_at: p('created_at'),
        updated_at: p('updated_at'),
        message_count: p('message_count'),
        message_seq: p('message_seq'),
        event_seq: p('event_seq'),
        owner_fence: p('owner_fence'),
      }),
    ),
    getSession: compile('oi_get_session', (p) =>
      db.selectFrom('sessions').selectAll().where('id', '=', p('id')).where('tenant_id', '=', p('tenant_id')),
    ),
    lockSession: compile('oi_lock_session', (p) =>
      db
        .updateTable('sessions')
        .set((eb) => ({ updated_at: eb.ref('updated_at') }))
        .where('id', '=', p('id'))
        .where('tenant_id', '=', p('tenant_id'))
        .returning('id'),
    ),
    deleteSession: compile('oi_delete_session', (p) => db.deleteFrom('sessions').where('id', '=', p('id'))),
    deleteMessages: compile('oi_delete_messages', (p) => db.deleteFrom('messages').where('session_id', '=', p('session_id'))),
    deleteEvents: compile('oi_delete_events', (p) => db.deleteFrom('events').where('session_id', '=', p('session_id'))),
    deleteSuspendedTurns: compile('oi_delete_suspended_turns', (p) => db.deleteFrom('suspended_turns').where('session_id', '=', p('session_id'))),
    deleteSessionResponseItems: compile('oi_delete_session_response_items', (p) =>
      db.deleteFrom('response_items').where('response_id', 'in', (eb) => eb.selectFrom('responses').select('id').where('session_id', '=', p('session_id'))),
    ),
    deleteSessionResponses: compile('oi_delete_session_responses', (p) => db.deleteFrom('responses').where('session_id', '=', p('session_id'))),
    updateResponse: compile('oi_update_response', (p) =>
      db
        .updateTable('responses')
        .set({ status: p('status'), response: p('response'), messages: p('messages') })
        .where('id', '=', p('id'))
        .where('tenant_id', '=', p('tenant_id'))
        .returning('id'),
    ),
    putResponseItem: compile('oi_put_response_item', (p) =>
      db
        .insertInto('response_items')
        .values({ tenant_id: p('tenant_id'), id: p('id'), response_id: p('response_id'), item: p('item') })
        .onConflict((oc) => oc.columns(['tenant_id', 'id']).doUpdateSet({ response_id: p('response_id'), item: p('item') })),
    ),
    deleteResponseItems: compile('oi_delete_response_items', (p) =>
      db.deleteFrom('response_items').where('response_id', '=', p('response_id')).where('tenant_id', '=', p('tenant_id')),
    ),
    deleteResponse: compile('oi_delete_response', (p) => db.deleteFrom('responses').where('id', '=', p('id')).where('tenant_id', '=', p('tenant_id')).returning('id')),
    touchSession: compile('oi_touch_session', (p) => db.updateTable('sessions').set({ updated_at: p('at') }).where('id', '=', p('id')).returning('id')),
    putSuspendedTurn: compile('oi_put_suspended_turn', (p) =>
      db
        .insertInto('suspended_turns')
        .values({ session_id: p('session_id'), id: p('id'), reason: p('reason'), state: p('state'), created_at: p('created_at') })
        .onConflict((oc) => oc.column('session_id').doUpdateSet({ id: p('id'), reason: p('reason'), state: p('state'), created_at: p('created_at') })),
    ),
    getSuspendedTurn: compile('oi_get_suspended_turn', (p) => db.selectFrom('suspended_turns').selectAll().where('session_id', '=', p('session_id'))),
    // RETURNING tells whether a row went, the same way on both engines
    claimSuspendedTurn: compile('oi_claim_suspended_turn', (p) =>
      db.deleteFrom('suspended_turns').where('session_id', '=', p('session_id')).where('id', '=', p('id')).returning('id'),
    ),
    clearSession: compile('oi_clear_session', (p) =>
      db
        .updateTable('sessions')
        .set({ message_count: sql<number>`0`, updated_at: p('at') })
        .where('id', '=', p('id'))
        .returning('id'),
    ),
    bumpSessionFenced: compile('oi_bump_session_fenced', (p) =>
      db
        .updateTable('sessions')
        .set((eb) => ({
          message_seq: eb('message_seq', '+', p('messages')),
          event_seq: eb('event_seq', '+', p('events')),
          message_count: eb('message_count', '+', p('messages')),
          updated_at: p('at'),
          owner_fence: p('fence'),
        }))
        .where('id', '=', p('id'))
        .where('owner_fence', '<=', p('fence'))
        .returning(['message_seq', 'event_seq']),
    ),
    sessionExists: compile('oi_session_exists', (p) => db.selectFrom('sessions').select('id').where('id', '=', p('id'))),
    bumpSession: compile('oi_bump_session', (p) =>
      db
        .updateTable('sessions')
        .set((eb) => ({
          message_seq: eb('message_seq', '+', p('messages')),
          event_seq: eb('event_seq', '+', p('events')),
          message_count: eb('message_count', '+', p('messages')),
          updated_at: p('at'),
        }))
        .where('id', '=', p('id'))
        .returning(['message_seq', 'event_seq']),
    ),
    insertMessage: compile('oi_insert_message', (p) =>
      db.insertInto('messages').values({
        session_id: p('session_id'),
        seq: p('seq'),
        id: p('id'),
        role: p('role'),
        type: p('type'),
        format: p('format'),
        stream: p('stream'),
        recipient: p('recipient'),
        content: p('content'),
        content_json: p('content_json'),
        created_at: p('created_at'),
      }),
    ),
    insertEvent: compile('oi_insert_event', (p) =>
      db.insertInto('events').values({
        session_id: p('session_id'),
        id: p('id'),
        type: p('type'),
        data: p('data'),
        created_at: p('created_at'),
      }),
    ),
    allMessages: compile('oi_all_messages', (p) =>
      db.selectFrom('messages').selectAll().where('session_id', '=', p('session_id')).orderBy('seq'),
    ),
    findApiKey: compile('oi_find_api_key', (p) => db.selectFrom('api_keys').selectAll().where('hash', '=', p('hash'))),
    markKeyUsed: compile('oi_mark_key_used', (p) =>
      db
        .updateTable('api_keys')
        .set({ last_used_at: p('at') })
        .where('id', '=', p('id'))
        .where((eb) => eb.or([eb('last_used_at', 'is', null), eb('last_used_at', '<', p('at'))])),
    ),
    getSettings: compile('oi_get_settings', (p) => db.selectFrom('settings').select('data').where('tenant_id', '=', p('tenant_id'))),
  } satisfies Record<string, Statement>
}
