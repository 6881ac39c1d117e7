import type { LmcMessage } from '../../schemas/lmc.js'

/**
 * The one store interface. Two implementations (SQLite and PostgreSQL) share it and one contract
 * test suite. Every session-scoped read takes the tenant id so ownership cannot be forgotten.
 * Timestamps are ISO-8601 UTC strings with `Z`.
 */
export interface SessionRecord {
  id: string
  tenantId: string
  title: string | null
  metadata: Record<string, unknown>
  model: string
  createdAt: string
  updatedAt: string
  messageCount: number
}

export interface EventRecord {
  /** Per-session increasing integer, starting at 1, no gaps. */
  id: number
  type: string
  createdAt: string
  data: unknown
}

export interface ApiKeyRecord {
  id: string
  name: string
  /** Display prefix, e.g. `oik_AbCd1234` — never enough to authenticate. */
  prefix: string
  /** Hex SHA-256 of the full key. */
  hash: string
  createdAt: string
  expiresAt: string | null
  lastUsedAt: string | null
}

export interface SecretRecord {
  name: string
  /** Encrypted blob (see services/crypto.ts); the store never sees plaintext. */
  ciphertext: string
  createdAt: string
  updatedAt: string
}

/**
 * A turn waiting on its client: for a code confirmation (`auto_run: false`) or for the results of
 * the client's own tool calls. At most one per session; `state` is the agent's to read (see
 * services/agent/loop.ts `Suspension`), the store only keeps it.
 */
export interface SuspendedTurnRecord {
  /** Changes with every suspension, so a resume claims exactly the one it read. */
  id: string
  sessionId: string
  reason: 'confirmation' | 'tool_calls'
  state: unknown
  createdAt: string
}

/**
 * One stored answer of the Responses API (`POST /v1/responses`): the Response object as served,
 * the input items it was asked with, and the LMC messages of its turn, which are the context of
 * any response that names it as `previous_response_id`.
 */
export interface ResponseRecord {
  /** `resp_` followed by 48 hex digits. */
  id: string
  tenantId: string
  /** The session the turn ran in (the code interpreter's container). */
  sessionId: string
  previousResponseId: string | null
  /** The Response's `status`: `queued`, `in_progress`, `completed`, `incomplete`, `failed` or `cancelled`. */
  status: string
  createdAt: string
  /** The Response object (OpenAI's wire format), as GET /v1/responses/{id} serves it. */
  response: Record<string, unknown>
  /** The request's input items with their ids, oldest first. */
  input: Record<string, unknown>[]
  /** This turn's LMC messages: the input the agent stored, then what it produced. */
  messages: LmcMessage[]
}

/** One entry of `Store.appendEntries`: a message (stored with its `message` event) or an event alone. */
export type AppendEntry = { message: LmcMessage } | { type: string; data: unknown }

export interface Page<T> {
  items: T[]
  nextCursor: string | null
}

export interface Store {
  readonly engine: 'sqlite' | 'postgres'
  /** Runs pending migrations; called once at start. */
  migrate(): Promise<void>
  /** Throws when the database cannot be used (readiness check). */
  ping(): Promise<void>
  close(): Promise<void>

  createSession(input: {
    tenantId: string
    title?: string | null
    metadata?: Record<string, unknown>
    model: string
  }): Promise<SessionRecord>
  getSession(tenantId: string, id: string): Promise<SessionRecord | undefined>
  /** Newest first; the cursor is opaque and stable while sessions are being created. */
  listSessions(tenantId: string, opts: { limit: number; cursor?: string }): Promise<Page<SessionRecord>>
  updateSession(
    tenantId: string,
    id: string,
    patch: { title?: string | null; metadata?: Record<string, unknown> },
  ): Promise<SessionRecord | undefined>
  /** Removes the session with its messages, events and suspended turn. */
  deleteSession(tenantId: string, id: string): Promise<boolean>
  /** Sessions whose updated_at is older than `before`. */
  listIdleSessions(before: string, limit: number): Promise<{ id: string; tenantId: string }[]>

  /**
   * Stores one message and its `message` event in one transaction (bumps updated_at and
   * message_count) and returns the event.
   */
  appendMessage(sessionId: string, message: LmcMessage, fence?: number): Promise<EventRecord>
  /**
   * Stores messages and events in the order given, all in one transaction (one commit for a
   * phase of a turn rather than one per entry): each message with its `message` event, each other
   * entry as an event. Returns the events in the same order; throws 404 when the session is gone,
   * storing nothing.
   */
  appendEntries(sessionId: string, entries: AppendEntry[], fence?: number): Promise<EventRecord[]>
  /** Oldest first; `after` is a message id. */
  listMessages(sessionId: string, opts: { after?: string; limit: number }): Promise<{ messages: LmcMessage[]; hasMore: boolean }>
  /** Every message of the session, oldest first (the agent's context). */
  allMessages(sessionId: string): Promise<LmcMessage[]>
  clearMessages(sessionId: string): Promise<void>

  /**
   * Also bumps the session's updated_at: any event is activity. With `fence` (appendMessage too),
   * the write is refused with 503 session_moved when a larger fence was recorded for the session,
   * and records `fence` otherwise: a replica that lost the session's lease cannot write after
   * the replica that took it over.
   */
  appendEvent(sessionId: string, type: string, data: unknown, fence?: number): Promise<EventRecord>
  /** Records the fencing generation of a new owner of the session (a no-op when not larger). */
  fenceSession(sessionId: string, fence: number): Promise<void>
  /**
   * Walks from `startId` to `endId`, both inclusive: ascending from 1 by default, or newest first
   * from the latest event when `reverse` is set (then `startId` is the upper bound).
   */
  listEvents(
    sessionId: string,
    opts: { startId?: number; endId?: number; reverse?: boolean; limit: number },
  ): Promise<{ events: EventRecord[]; hasMore: boolean }>

  /** Stores the session's suspended turn, replacing any earlier one. Throws session_not_found. */
  putSuspendedTurn(turn: Omit<SuspendedTurnRecord, 'createdAt'>): Promise<SuspendedTurnRecord>
  getSuspendedTurn(sessionId: string): Promise<SuspendedTurnRecord | undefined>
  /**
   * Removes the suspended turn if it is still the one with `id`: true for exactly one caller, so
   * two resumes (two replicas, a retried request) cannot both continue the turn.
   */
  claimSuspendedTurn(sessionId: string, id: string): Promise<boolean>

  createApiKey(key: ApiKeyRecord): Promise<void>
  findApiKeyByHash(hash: string): Promise<ApiKeyRecord | undefined>
  listApiKeys(): Promise<ApiKeyRecord[]>
  deleteApiKey(id: string): Promise<boolean>
  markApiKeysUsed(used: { id: string; at: string }[]): Promise<void>

  createResponse(record: ResponseRecord): Promise<void>
  getResponse(tenantId: string, id: string): Promise<ResponseRecord | undefined>
  /**
   * Replaces status, Response object and messages of a stored response; false when there is none.
   * The Response's output items with an `id` become findable with `getResponseItems`.
   */
  updateResponse(
    tenantId: string,
    id: string,
    patch: Pick<ResponseRecord, 'status' | 'response' | 'messages'>,
  ): Promise<boolean>
  deleteResponse(tenantId: string, id: string): Promise<boolean>
  /** Output items of the tenant's stored responses by item id (an `item_reference`); unknown ids are left out. */
  getResponseItems(tenantId: string, ids: string[]): Promise<Map<string, Record<string, unknown>>>
  /**
   * The LMC messages of a response and of every response before it through
   * `previous_response_id`, oldest first; undefined when the tenant has no such response. The
   * walk stops at a link that was deleted.
   */
  responseContext(tenantId: string, id: string): Promise<LmcMessage[] | undefined>

  getSettings(tenantId: string): Promise<Record<string, unknown>>
  putSettings(tenantId: string, settings: Record<string, unknown>): Promise<void>

  listSecrets(tenantId: string): Promise<SecretRecord[]>
  putSecret(tenantId: string, name: string, ciphertext: string): Promise<void>
  deleteSecret(tenantId: string, name: string): Promise<boolean>
}
