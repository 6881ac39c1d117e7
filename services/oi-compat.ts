import type { LmcChunk, LmcInput, LmcMessage } from '../schemas/lmc.js'
import type { ChatRequest, ChatService } from './chat.js'
import { randomUUID } from 'node:crypto'
import { ApiError, invalidRequest, notFound, sessionBusy } from './errors.js'
import type { EventBus } from './events.js'
import type { RunRegistry } from './runs.js'
import type { SessionService } from './sessions.js'
import type { SettingsService } from './settings.js'
import type { EventRecord, SessionRecord, Store } from './store/types.js'

/**
 * Open Interpreter's `--server` protocol (`interpreter/core/async_core.py`) over the same core:
 * one default session per tenant, shared by that tenant's sockets as upstream shares one
 * interpreter. What a socket receives is derived from the session's event log plus the chunks of
 * the message being streamed, so a socket that reconnects gets exactly what it had not received.
 *
 * Output frames, as upstream's `_respond_and_store` flags them:
 * - a block opens with `{role, type, format?, start: true}`, content chunks are
 *   `{role, type, format?, content}`, and it closes with `{role, type, format?, end: true}`;
 *   consecutive messages with the same role, type and format share a block;
 * - console blocks carry no `format` on their flags; their content is `format: "output"`,
 *   while code runs `{format: "active_line", content: N}` says which line of it runs (only
 *   live: they are not logged, and a reconnecting client has no use for stale line numbers),
 *   and `{format: "active_line", content: null}` closes the execution's output;
 * - `{"role":"server","type":"status","content":"complete"}` after every answer, and when the
 *   answer is suspended waiting for code to be approved (`command` `go` resumes it); none after
 *   a stopped answer;
 * - `{"role":"server","type":"error","content": message}` then `complete` on failure.
 * In acknowledgement mode every frame also carries an `id` the client returns as `{"ack": id}`.
 */

/** A frame sent to an Open Interpreter client (JSON object). */
export type OiFrame = Record<string, unknown>

interface Base {
  role: string
  type: string
  format?: string
}

/**
 * What a tenant's clients have received: every output of the log events up to `event`, the
 * first `chars` of the content of `message` (the next message, partly received), and the block
 * that is open.
 */
export interface OiPosition {
  event: number
  message?: { id: string; chars: number }
  open: Base | null
  /** Inside a run: messages logged outside one (history posted to /settings, an import) are not output. */
  run?: boolean
  /** The open console block's `active_line: null` is out; its `end` is not. */
  lineEnded?: boolean
  /** The error of this `run_failed` event is out; its `complete` is not. */
  failed?: number
}

/** A frame with the position reached once the client has it. */
interface Positioned {
  body: OiFrame
  after: OiPosition
}

export const COMPLETE: OiFrame = { role: 'server', type: 'status', content: 'complete' }

/** Open Interpreter's text messages have no format, and console flags none either. */
const baseOf = (m: { role: string; type: string; format?: string }): Base =>
  m.type === 'console' || m.type === 'message' ? { role: m.role, type: m.type } : { role: m.role, type: m.type, ...(m.format ? { format: m.format } : {}) }
const sameBase = (a: Base | null, b: Base) => a !== null && a.role === b.role && a.type === b.type && a.format === b.format
/** Messages an Open Interpreter client never sees: its own input and the server's approval requests. */
const hidden = (m: { role: string; type: string }) => m.role === 'user' || m.type === 'confirmation'

/** Orders positions as the frames that lead to them are sent. */
export function after(a: OiPosition, b: OiPosition): boolean {
  if (a.event !== b.event) return a.event > b.event
  return (a.message?.chars ?? -1) > (b.message?.chars ?? -1)
}

/**
 * Turns messages, streamed content and run events into frames, from a position. Pure: the
 * channel runs one for the live output and a fresh one, from a client's position, for a replay.
 */
export class OiFramer {
  pos: OiPosition

  constructor(from: OiPosition) {
    this.pos = structuredClone(from)
  }

  /** Content of message `id` (its first chars are already framed when `pos.message` says so). */
  text(head: Base & { id: string }, text: string): Positioned[] {
    if (!text) return []
    const frames: Positioned[] = []
    const base = baseOf(head)
    const chars = this.pos.message?.id === head.id ? this.pos.message.chars : 0
    if (!sameBase(this.pos.open, base)) {
      frames.push(...this.close())
      this.pos = { ...this.pos, message: { id: head.id, chars }, open: base }
      frames.push(this.frame({ ...base, start: true }))
    }
    this.pos = { ...this.pos, message: { id: head.id, chars: chars + text.length } }
    frames.push(this.frame({ ...base, ...(head.type === 'console' ? { format: 'output' } : {}), content: text }))
    return frames
  }

  /**
   * The running line of the code: inside a console block (opened for it when the code has not
   * written anything yet, as upstream's console block opens with the first line).
   */
  line(line: number): Positioned[] {
    const base: Base = { role: 'computer', type: 'console' }
    const frames: Positioned[] = []
    if (!sameBase(this.pos.open, base)) {
      frames.push(...this.close())
      this.pos = { ...this.pos, open: base }
      frames.push(this.frame({ ...base, start: true }))
    }
    frames.push(this.frame({ ...base, format: 'active_line', content: line }))
    return frames
  }

  /** A logged event: a complete message (what of it was not framed yet) or a run event. */
  event(event: EventRecord, streamed?: { id: string; chars: number }): Positioned[] {
    if (event.id <= this.pos.event) return []
    let frames: Positioned[] = []
    if (event.type === 'run_started') {
      this.pos = { ...this.pos, event: event.id, run: true }
      return []
    }
    if (event.type === 'message') {
      const message = event.data as LmcMessage
      if (this.pos.run && !hidden(message) && typeof message.content === 'string') {
        const done = this.pos.message?.id === message.id ? this.pos.message.chars : streamed?.id === message.id ? streamed.chars : 0
        frames = this.text(message, message.content.slice(done))
      }
      this.pos = { ...this.pos, event: event.id, message: undefined }
      return frames
    }
    const data = (event.data ?? {}) as { stopped?: boolean; error?: { message?: string } }
    if (event.type === 'awaiting_confirmation') {
      frames = [...this.close(), this.frame(COMPLETE, event.id, true)]
    } else if (event.type === 'run_finished' && !data.stopped) {
      frames = [...this.close(), this.frame(COMPLETE, event.id, false)]
    } else if (event.type === 'run_finished') {
      frames = this.close()
      this.pos = { ...this.pos, run: false }
    } else if (event.type === 'run_failed') {
      frames = this.close()
      if (this.pos.failed !== event.id) {
        this.pos = { ...this.pos, failed: event.id }
        frames.push(this.frame({ role: 'server', type: 'error', content: data.error?.message ?? 'The run failed' }))
      }
      frames.push(this.frame(COMPLETE, event.id, false))
    }
    // A message partly framed stays the next one: its own event comes later in the log.
    this.pos = { ...this.pos, event: Math.max(this.pos.event, event.id) }
    return frames
  }

  /** Ends the open block (a console block first says no line is running any more). */
  close(): Positioned[] {
    const open = this.pos.open
    if (!open) return []
    const frames: Positioned[] = []
    if (open.type === 'console' && !this.pos.lineEnded) {
      this.pos = { ...this.pos, lineEnded: true }
      frames.push(this.frame({ ...open, format: 'active_line', content: null }))
    }
    const { lineEnded: _, ...rest } = this.pos
    this.pos = { ...rest, open: null }
    frames.push(this.frame({ ...open, end: true }))
    return frames
  }

  private frame(body: OiFrame, event?: number, run?: boolean): Positioned {
    if (event !== undefined) this.pos = { event, open: null, run }
    return { body, after: structuredClone(this.pos) }
  }
}

/** One client connection of a channel (a WebSocket), as the channel sees it. */
export interface OiClient {
  /** Acknowledgement mode: frames carry an `id` and count as received once acknowledged. */
  readonly ack: boolean
  /** Sends one frame; false when the connection is gone. */
  send(frame: OiFrame): boolean
}

interface Attached {
  client: OiClient
  /** Frames sent in acknowledgement mode and not acknowledged yet, by id. */
  unacked: Map<string, OiPosition>
}

export interface OiChannelDeps {
  store: Store
  bus: EventBus
  chat: ChatService
  runs: RunRegistry
  onError: (err: unknown) => void
}

/**
 * The output of a tenant's default session, for its clients. Everything (live chunks, logged
 * events, clients joining) goes through one queue, so each client gets every frame once, in order.
 */
export class OiChannel {
  private queue: Promise<void> = Promise.resolve()
  private readonly framer: OiFramer
  /** What the clients received (sent, or acknowledged in acknowledgement mode). */
  private delivered: OiPosition
  /** The message being streamed by a turn of this channel: its content so far. */
  private current: { id: string; head: Base; content: string } | undefined
  private readonly clients = new Set<Attached>()
  private unsubscribe: () => void
  private running: Promise<unknown> | undefined
  private frameIds = 0
  closed = false

  constructor(
    readonly session: SessionRecord,
    private readonly deps: OiChannelDeps,
    latestEvent: number,
  ) {
    this.framer = new OiFramer({ event: latestEvent, open: null })
    this.delivered = { event: latestEvent, open: null }
    this.unsubscribe = deps.bus.subscribe(session.id, (event) => this.enqueue(() => this.onEvent(event)))
  }

  get sessionId(): string {
    return this.session.id
  }

  /** Adds a client: it first gets what no client has received yet, then the live output. */
  attach(client: OiClient): () => void {
    const attached: Attached = { client, unacked: new Map() }
    this.enqueue(async () => {
      const replay = new OiFramer(this.delivered)
      for (;;) {
        if (replay.pos.event >= this.framer.pos.event) break
        const page = await this.deps.store.listEvents(this.sessionId, { startId: replay.pos.event + 1, endId: this.framer.pos.event, limit: 100 })
        for (const event of page.events) this.deliver(attached, replay.event(event))
        if (!page.hasMore) break
      }
      const current = this.current
      if (current) {
        const done = replay.pos.message?.id === current.id ? replay.pos.message.chars : 0
        this.deliver(attached, replay.text({ ...current.head, id: current.id }, current.content.slice(done)))
      }
      this.clients.add(attached)
    })
    return () => {
      this.enqueue(async () => {
        this.clients.delete(attached)
      })
    }
  }

  /** An `{"ack": id}` from a client in acknowledgement mode. */
  acknowledge(client: OiClient, id: unknown): void {
    this.enqueue(async () => {
      for (const attached of this.clients) {
        if (attached.client !== client || typeof id !== 'string') continue
        const position = attached.unacked.get(id)
        if (!position) return
        // Frames are received in order: an acknowledgement covers every frame before it.
        for (const key of attached.unacked.keys()) {
          attached.unacked.delete(key)
          if (key === id) break
        }
        if (after(position, this.delivered)) this.delivered = position
      }
    })
  }

  /** Frames not tied to the log (a refused turn), for the client that caused them. */
  notify(client: OiClient, frames: OiFrame[]): void {
    this.enqueue(async () => {
      for (const frame of frames) client.send(client.ack ? { ...frame, id: `n${++this.frameIds}` } : frame)
    })
  }

  /**
   * Runs one turn with the user's messages. A turn of this channel still running is stopped
   * first (a new message interrupts the answer, as upstream does). Refusals before the turn
   * started (no upstream, another API running this session) come back as error frames.
   */
  async turn(tenantId: string, inputs: LmcInput[], from: OiClient): Promise<void> {
    if (this.running) {
      this.deps.runs.stop(this.sessionId)
      await this.running.catch(() => {})
    }
    this.start(from, (req) => this.deps.chat.run({ ...req, tenantId, inputs, activeLines: true }))
  }

  /**
   * Approves the code the answer waits on (`command` `go`): the suspended turn resumes. With
   * none waiting, the refusal (409 nothing_to_confirm) comes back as an error frame.
   */
  approve(tenantId: string, from: OiClient): void {
    if (this.running) return this.notify(from, [errorFrame(new ApiError(409, 'conflict_error', 'session_busy', 'The answer is still running')), COMPLETE])
    this.start(from, (req) => this.deps.chat.confirm({ ...req, tenantId, approve: true, activeLines: true }))
  }

  /** Stops the answer in progress, or ends the one waiting for approval (`command` `stop`): no `complete` follows. */
  async stop(): Promise<void> {
    if (this.deps.runs.stop(this.sessionId)) return
    await this.deps.chat.cancelSuspended(this.sessionId)
  }

  private start(from: OiClient, call: (req: Pick<ChatRequest, 'sessionId' | 'onStart' | 'emit'>) => Promise<unknown>): void {
    let started = false
    // run() refuses synchronously (503, 409): inside then() that becomes a rejection handled below
    const run = Promise.resolve()
      .then(() =>
        call({
          sessionId: this.sessionId,
          onStart: () => {
            started = true
          },
          emit: (chunk) => this.enqueue(async () => this.onChunk(chunk)),
        }),
      )
      .catch((err: unknown) => {
        // Failures after the start are in the log (run_failed) and reach every client from there.
        if (!started) this.notify(from, [errorFrame(err), COMPLETE])
      })
    this.running = run
    void run.finally(() => {
      if (this.running === run) this.running = undefined
    })
  }

  /** Resolves once every queued step ran (tests, shutdown). */
  idle(): Promise<void> {
    return this.queue
  }

  close(): void {
    this.closed = true
    this.unsubscribe()
    this.deps.runs.stop(this.sessionId)
  }

  private onChunk(chunk: LmcChunk): void {
    if (chunk.format === 'active_line') {
      if (typeof chunk.content === 'number') this.broadcast(this.framer.line(chunk.content))
      return
    }
    if (hidden(chunk)) return
    if (chunk.start) {
      this.current = { id: chunk.id, head: baseOf(chunk), content: '' }
      return
    }
    const current = this.current
    if (chunk.end || typeof chunk.content !== 'string' || current?.id !== chunk.id) return
    current.content += chunk.content
    this.broadcast(this.framer.text({ ...current.head, id: chunk.id }, chunk.content))
  }

  private onEvent(event: EventRecord): void {
    const current = this.current
    let streamed: { id: string; chars: number } | undefined
    if (event.type === 'message' && current && (event.data as LmcMessage).id === current.id) {
      streamed = { id: current.id, chars: current.content.length }
      this.current = undefined
    }
    this.broadcast(this.framer.event(event, streamed))
  }

  private broadcast(frames: Positioned[]): void {
    for (const attached of this.clients) this.deliver(attached, frames)
  }

  private deliver(attached: Attached, frames: Positioned[]): void {
    for (const { body, after: position } of frames) {
      if (attached.client.ack) {
        const id = `f${++this.frameIds}`
        if (!attached.client.send({ ...body, id })) return
        attached.unacked.set(id, position)
      } else {
        if (!attached.client.send(body)) return
        if (after(position, this.delivered)) this.delivered = position
      }
    }
  }

  private enqueue(step: () => Promise<void> | void): void {
    this.queue = this.queue.then(step).catch(this.deps.onError)
  }
}

function errorFrame(err: unknown): OiFrame {
  const message = err instanceof ApiError ? err.message : 'Internal server error'
  return { role: 'server', type: 'error', content: message }
}

/** Marks the default session of a tenant among its sessions. */
export const DEFAULT_SESSION_MARK = 'open_interpreter'

export interface OiCompatDeps extends Omit<OiChannelDeps, 'onError'> {
  sessions: SessionService
  settings: SettingsService
  onError?: (err: unknown) => void
}

/** The names `GET /settings/{name}` answers. */
export const OI_SETTINGS = ['messages', 'auto_run', 'custom_instructions', 'system_message', 'llm'] as const
/** What upstream's `llm` settings may change here; its URL and key are the operator's (GHSA-wpr7-5j9p-qch9). */
const LLM_FIELDS = new Set(['model', 'temperature', 'max_tokens'])
const REFUSED_LLM_FIELDS = new Set(['api_base', 'api_key', 'base_url', 'api_version', 'provider'])
const POSTABLE = new Set(['messages', 'custom_instructions', 'system_message', 'llm'])
const forbidden = (message: string, param: string) => new ApiError(403, 'permission_error', 'forbidden', message, param)

/**
 * The tenants' channels. The default session is the tenant's newest session whose metadata has
 * `source: "open_interpreter"`; a deleted (or expired) one is replaced by a new one on next use.
 */
export class OiCompat {
  private readonly channels = new Map<string, Promise<OiChannel>>()

  constructor(private readonly deps: OiCompatDeps) {}

  /** The tenant's channel, made (with its session) on first use. */
  async channel(tenantId: string): Promise<OiChannel> {
    const known = this.channels.get(tenantId)
    if (known) {
      const channel = await known.catch(() => undefined)
      if (channel && !channel.closed && (await this.deps.store.getSession(tenantId, channel.sessionId))) return channel
      if (this.channels.get(tenantId) === known) {
        channel?.close()
        this.channels.delete(tenantId)
      }
    }
    let pending = this.channels.get(tenantId)
    if (!pending) {
      pending = this.open(tenantId)
      this.channels.set(tenantId, pending)
      pending.catch(() => this.channels.delete(tenantId))
    }
    return pending
  }

  /** The tenant's default session, made when there is none. */
  async session(tenantId: string): Promise<SessionRecord> {
    return (await this.channel(tenantId)).session
  }

  /** `GET /settings/{name}`: `{name: value}`; 404 for other names. */
  async setting(tenantId: string, name: string): Promise<Record<string, unknown>> {
    if (!(OI_SETTINGS as readonly string[]).includes(name)) throw notFound(`Setting '${name}'`)
    if (name === 'messages') return { messages: oiMessages(await this.deps.store.allMessages((await this.session(tenantId)).id)) }
    const settings = await this.deps.settings.get(tenantId)
    if (name === 'llm') return { llm: { model: settings.model, temperature: settings.temperature, max_tokens: settings.max_tokens } }
    return { [name]: settings[name as 'auto_run' | 'custom_instructions' | 'system_message'] }
  }

  /**
   * `POST /settings` (its body already checked against the schema for types): an allowlist.
   * `auto_run`, `computer` and the upstream's URL or key: 403 (advisory GHSA-wpr7-5j9p-qch9);
   * other names: 400. Every name is checked before anything is applied. `messages` replaces the
   * default session's conversation (409 while it runs); the rest are the tenant's settings.
   */
  async applySettings(tenantId: string, body: Record<string, unknown>): Promise<void> {
    for (const key of Object.keys(body)) {
      if (key === 'auto_run' || key === 'computer')
        throw forbidden(`${key} cannot be changed over the Open Interpreter protocol (advisory GHSA-wpr7-5j9p-qch9); auto_run is a tenant setting: PATCH /v1/settings`, key)
      if (!POSTABLE.has(key)) throw invalidRequest(`Unknown or unsupported setting '${key}'`, key, 'unsupported_setting')
    }
    const llm = (body.llm ?? {}) as Record<string, unknown>
    for (const key of Object.keys(llm)) {
      if (REFUSED_LLM_FIELDS.has(key)) throw forbidden(`llm.${key} is the server operator's and cannot be changed over HTTP`, `llm.${key}`)
      if (!LLM_FIELDS.has(key)) throw invalidRequest(`Unknown or unsupported setting 'llm.${key}'`, `llm.${key}`, 'unsupported_setting')
    }
    const patch = {
      ...(llm.model !== undefined ? { model: llm.model as string } : {}),
      ...(llm.temperature !== undefined ? { temperature: llm.temperature as number } : {}),
      ...(llm.max_tokens !== undefined ? { max_tokens: llm.max_tokens as number } : {}),
      ...(typeof body.custom_instructions === 'string' ? { custom_instructions: body.custom_instructions } : {}),
      ...(typeof body.system_message === 'string' ? { system_message: body.system_message } : {}),
    }
    if (Array.isArray(body.messages)) {
      const session = await this.session(tenantId)
      if (this.deps.runs.get(session.id)) throw sessionBusy()
      await this.deps.store.clearMessages(session.id)
      for (const m of body.messages as LmcInput[]) {
        await this.deps.bus.appendMessage(session.id, {
          id: randomUUID(),
          role: m.role,
          type: m.type ?? 'message',
          ...(m.format ? { format: m.format } : {}),
          content: m.content,
          created_at: new Date().toISOString(),
        })
      }
    }
    if (Object.keys(patch).length > 0) await this.deps.settings.patch(tenantId, patch)
  }

  /** Stops every channel's run and subscription (shutdown). */
  async close(): Promise<void> {
    const all = await Promise.allSettled(this.channels.values())
    this.channels.clear()
    for (const result of all) if (result.status === 'fulfilled') result.value.close()
  }

  private async open(tenantId: string): Promise<OiChannel> {
    const session = (await this.find(tenantId)) ?? (await this.deps.sessions.create(tenantId, { title: 'Open Interpreter', metadata: { source: DEFAULT_SESSION_MARK } }))
    const latest = await this.deps.store.listEvents(session.id, { reverse: true, limit: 1 })
    return new OiChannel(session, { ...this.deps, onError: this.deps.onError ?? (() => {}) }, latest.events[0]?.id ?? 0)
  }

  private async find(tenantId: string): Promise<SessionRecord | undefined> {
    let cursor: string | undefined
    for (;;) {
      const page = await this.deps.sessions.list(tenantId, { limit: 100, ...(cursor ? { cursor } : {}) })
      const found = page.items.find((s) => s.metadata.source === DEFAULT_SESSION_MARK)
      if (found) return found
      if (!page.nextCursor) return undefined
      cursor = page.nextCursor
    }
  }
}

/** The messages as Open Interpreter shows them (`GET /settings/messages`): no ids, no approval requests. */
export function oiMessages(messages: LmcMessage[]): OiFrame[] {
  return messages
    .filter((m) => m.type !== 'confirmation')
    .map((m) => ({ role: m.role, type: m.type, ...(m.format && m.type !== 'message' ? { format: m.format } : {}), content: m.content }))
}

/**
 * Builds user messages from `start` / content / `end` chunks the way upstream's `accumulate`
 * does: content with the type and format of the last message extends it, other content starts a
 * new message. Bounded: past `maxChars` of content the message is refused.
 */
export class OiInput {
  private messages: { role: string; type?: string; format?: string; content: string }[] = []
  private chars = 0

  constructor(private readonly maxChars: number) {}

  get started(): boolean {
    return this.messages.length > 0
  }

  start(chunk: Record<string, unknown>): void {
    this.messages = []
    this.chars = 0
    this.push({ ...chunk, content: typeof chunk.content === 'string' ? chunk.content : '' }, true)
  }

  add(chunk: Record<string, unknown>): void {
    if (chunk.format === 'active_line') return
    if (typeof chunk.content !== 'string') throw new ApiError(400, 'validation_error', 'invalid_message', 'Message content must be a string')
    this.push(chunk, false)
  }

  /** The accumulated messages, and resets. */
  take(): { role: string; type?: string; format?: string; content: string }[] {
    const taken = this.messages
    this.messages = []
    this.chars = 0
    return taken
  }

  private push(chunk: Record<string, unknown>, fresh: boolean): void {
    const content = String(chunk.content ?? '')
    this.chars += content.length
    if (this.chars > this.maxChars) {
      this.messages = []
      this.chars = 0
      throw new ApiError(413, 'validation_error', 'payload_too_large', `A message may hold at most ${this.maxChars} characters`)
    }
    const type = typeof chunk.type === 'string' ? chunk.type : undefined
    const format = typeof chunk.format === 'string' ? chunk.format : undefined
    const last = this.messages.at(-1)
    if (!fresh && last) {
      const typeFits = last.type === undefined || type === undefined || last.type === type
      const formatFits = last.format === undefined || format === undefined || last.format === format
      if (typeFits && formatFits) {
        last.type ??= type
        last.format ??= format
        last.content += content
        return
      }
    }
    if (!fresh && !last) throw new ApiError(400, 'validation_error', 'invalid_message', "Send a 'start' chunk first to create the message")
    this.messages.push({ role: typeof chunk.role === 'string' ? chunk.role : 'user', ...(type ? { type } : {}), ...(format ? { format } : {}), content })
  }
}
