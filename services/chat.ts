import { randomUUID } from 'node:crypto'
import type { LmcChunk, LmcInput, LmcMessage } from '../schemas/lmc.js'
import type { RunConfig, Settings } from '../schemas/settings.js'
import { runTurn, type PassThrough, type TokenUsage, type TurnResult } from './agent/loop.js'
import { ApiError, sessionBusy, sessionNotFound } from './errors.js'
import type { EventBus } from './events.js'
import type { ExecutionService } from './execution.js'
import type { Language } from './kernels/types.js'
import type { Metrics } from './metrics.js'
import type { Run, RunRegistry } from './runs.js'
import type { SecretsService } from './secrets.js'
import type { SettingsService } from './settings.js'
import type { SessionRecord, Store } from './store/types.js'
import type OpenAI from 'openai'

export interface ChatRequest {
  tenantId: string
  sessionId: string
  inputs: LmcInput[]
  config?: RunConfig
  /** The effective settings for `config`, when the caller already resolved them; read otherwise. */
  settings?: Settings
  /** Sent with every upstream call of the turn (the OpenAI route's stop, seed, top_p…). */
  passThrough?: PassThrough
  /** Replaces the system message for this run (the OpenAI route's system/developer messages). */
  systemMessage?: string
  emit?: (chunk: LmcChunk) => void
  /**
   * Called once the upstream first answered and the user's messages are stored: from here on
   * the turn has side effects, and a streaming route can commit to its 200.
   */
  onStart?: () => void
  /**
   * Store nothing until the upstream first answers, so a turn the upstream refuses can be
   * retried as it is (the OpenAI route, whose SDKs retry). Otherwise the user's messages and
   * `run_started` are stored before the first upstream call, as observers of the log expect.
   */
  storeOnAnswer?: boolean
  /** The caller made the session for this turn: a turn that fails before it started deletes it. */
  newSession?: boolean
  /** Aborted when the client goes away. */
  signal?: AbortSignal
}

export interface ChatResult extends TurnResult {
  model: string
}

export interface ChatDeps {
  store: Store
  bus: EventBus
  runs: RunRegistry
  settings: SettingsService
  secrets: SecretsService
  execution: ExecutionService
  metrics: Metrics
  client: () => OpenAI
  languages: () => Promise<Language[]>
  tools: boolean
  maxOutputChars: number
}

const envelopeOf = (err: unknown) =>
  err instanceof ApiError
    ? { message: err.message, type: err.type, code: err.code, param: err.param }
    : { message: 'Internal server error', type: 'server_error', code: 'internal_error', param: null }

/**
 * One agent turn in a session: stores the new user messages, runs the loop with the session's
 * kernel as executor, stores each message as it completes and records run events. One run per
 * session at a time (409 otherwise); `runs.stop(sessionId)` cancels it.
 */
export class ChatService {
  constructor(private readonly deps: ChatDeps) {}

  /**
   * The checks that can refuse a chat before anything exists for it: 503 without an upstream,
   * 409 when the session already runs. Callers run it before they create a session.
   */
  check(sessionId?: string): void {
    this.deps.client()
    if (sessionId && this.deps.runs.get(sessionId)) throw sessionBusy()
  }

  /** The session a chat runs in: the named one (404 if it is not the tenant's), or a new one once the checks passed. */
  async session(tenantId: string, named: string | undefined, create: () => Promise<SessionRecord>): Promise<SessionRecord> {
    if (named) {
      const session = await this.deps.store.getSession(tenantId, named)
      if (!session) throw sessionNotFound()
      this.check(session.id)
      return session
    }
    this.check()
    return create()
  }

  /**
   * Throws synchronously when the run cannot start (no upstream configured: 503; the session
   * already runs: 409), so a caller can still answer with a plain error before it opens a stream.
   *
   * With `storeOnAnswer` nothing is stored until the upstream first answers: a turn the upstream
   * refuses (429, 400, 5xx before any output) leaves the session as it was and can be retried as
   * it is. Any failure after something was stored is marked not retryable (`x-should-retry:
   * false`): the user's messages are stored and code may have run, so a blind retry would repeat them.
   */
  run(req: ChatRequest): Promise<ChatResult> {
    const client = this.deps.client()
    const run = this.deps.runs.begin(req.sessionId)
    return this.turn(req, client, run)
  }

  private async turn(req: ChatRequest, client: OpenAI, run: Run): Promise<ChatResult> {
    const { store, bus, runs, metrics } = this.deps
    const cancel = () => run.controller.abort()
    if (req.signal?.aborted) cancel()
    req.signal?.addEventListener('abort', cancel, { once: true })
    let started: Promise<void> | undefined
    try {
      const [settings, secrets, languages, stored] = await Promise.all([
        req.settings ?? this.deps.settings.effective(req.tenantId, req.config),
        this.deps.secrets.forTenant(req.tenantId),
        this.deps.languages(),
        store.allMessages(req.sessionId),
      ])
      const inputs = req.inputs.map(
        (input) =>
          ({
            id: randomUUID(),
            role: input.role,
            type: input.type ?? 'message',
            ...(input.format ? { format: input.format } : {}),
            ...(input.recipient ? { recipient: input.recipient } : {}),
            content: typeof input.content === 'string' ? secrets.redact(input.content) : input.content,
            created_at: new Date().toISOString(),
          }) as LmcMessage,
      )
      const start = () => {
        started ??= (async () => {
          for (const message of inputs) await bus.appendMessage(req.sessionId, message)
          await bus.append(req.sessionId, 'run_started', { model: settings.model })
          req.onStart?.()
        })()
        return started
      }
      if (!req.storeOnAnswer) await start()
      const result = await runTurn({
        client,
        model: settings.model,
        temperature: settings.temperature,
        maxTokens: settings.max_tokens,
        ...(req.passThrough ? { passThrough: req.passThrough } : {}),
        maxIterations: settings.max_iterations,
        systemMessage: req.systemMessage ?? (settings.system_message || undefined),
        customInstructions: settings.custom_instructions || undefined,
        history: [...stored, ...inputs],
        languages,
        tools: this.deps.tools,
        autoRun: settings.auto_run,
        answered: start,
        execute: (language, code, onOutput, signal) =>
          this.deps.execution.run({ tenantId: req.tenantId, sessionId: req.sessionId, language, code, onOutput, signal }),
        confirm: async (code) => {
          await bus.append(req.sessionId, 'awaiting_confirmation', { message_id: code.id })
          return run.awaitConfirmation(code)
        },
        persist: async (message) => {
          await bus.appendMessage(req.sessionId, message)
        },
        emit: req.emit ?? (() => {}),
        redact: secrets.redact,
        signal: run.signal,
        maxOutputChars: this.deps.maxOutputChars,
      })
      // A turn stopped before the upstream answered still keeps what the user said.
      await start()
      this.count(result.usage)
      metrics.runs.inc({ outcome: result.stopped ? 'stopped' : 'finished' })
      await bus.append(req.sessionId, 'run_finished', { usage: result.usage, stopped: result.stopped })
      return { ...result, model: settings.model }
    } catch (err) {
      metrics.runs.inc({ outcome: 'failed' })
      if (!started) {
        if (req.newSession) await store.deleteSession(req.tenantId, req.sessionId).catch(() => {})
        throw err
      }
      await started.catch(() => {})
      await bus.append(req.sessionId, 'run_failed', { error: envelopeOf(err) }).catch(() => {})
      throw err instanceof ApiError ? err.final() : new ApiError(500, 'server_error', 'internal_error', 'Internal server error', null, {}, { cause: err }).final()
    } finally {
      req.signal?.removeEventListener('abort', cancel)
      runs.end(run)
    }
  }

  private count(usage: TokenUsage) {
    this.deps.metrics.upstreamTokens.inc({ kind: 'prompt' }, usage.prompt_tokens)
    this.deps.metrics.upstreamTokens.inc({ kind: 'completion' }, usage.completion_tokens)
  }
}
