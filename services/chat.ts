import { randomUUID } from 'node:crypto'
import type { LmcChunk, LmcInput, LmcMessage } from '../schemas/lmc.js'
import type { RunConfig, Settings } from '../schemas/settings.js'
import { runTurn, type Sampling, type TokenUsage, type TurnResult } from './agent/loop.js'
import { ApiError } from './errors.js'
import type { EventBus } from './events.js'
import type { ExecutionService } from './execution.js'
import type { Language } from './kernels/types.js'
import type { Metrics } from './metrics.js'
import type { Run, RunRegistry } from './runs.js'
import type { SecretsService } from './secrets.js'
import type { SettingsService } from './settings.js'
import type { Store } from './store/types.js'
import type OpenAI from 'openai'

export interface ChatRequest {
  tenantId: string
  sessionId: string
  inputs: LmcInput[]
  config?: RunConfig
  /** The effective settings for `config`, when the caller already resolved them; read otherwise. */
  settings?: Settings
  /** Sent with every upstream call of the turn (the OpenAI route's stop, seed, top_p…). */
  sampling?: Sampling
  /** Replaces the system message for this run (the OpenAI route's system/developer messages). */
  systemMessage?: string
  emit?: (chunk: LmcChunk) => void
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
   * Throws synchronously when the run cannot start (no upstream configured: 503; the session
   * already runs: 409), so a caller can still answer with a plain error before it opens a stream.
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
    try {
      const [settings, secrets, languages] = await Promise.all([
        req.settings ?? this.deps.settings.effective(req.tenantId, req.config),
        this.deps.secrets.forTenant(req.tenantId),
        this.deps.languages(),
      ])
      for (const input of req.inputs) {
        const message = {
          id: randomUUID(),
          role: input.role,
          type: input.type ?? 'message',
          ...(input.format ? { format: input.format } : {}),
          ...(input.recipient ? { recipient: input.recipient } : {}),
          content: typeof input.content === 'string' ? secrets.redact(input.content) : input.content,
          created_at: new Date().toISOString(),
        } as LmcMessage
        await bus.appendMessage(req.sessionId, message)
      }
      // The history is messages only, all stored by now: it need not wait for the event's commit.
      const [, history] = await Promise.all([
        bus.append(req.sessionId, 'run_started', { model: settings.model }),
        store.allMessages(req.sessionId),
      ])
      const result = await runTurn({
        client,
        model: settings.model,
        temperature: settings.temperature,
        maxTokens: settings.max_tokens,
        ...(req.sampling ? { sampling: req.sampling } : {}),
        maxIterations: settings.max_iterations,
        systemMessage: req.systemMessage ?? (settings.system_message || undefined),
        customInstructions: settings.custom_instructions || undefined,
        history,
        languages,
        tools: this.deps.tools,
        autoRun: settings.auto_run,
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
      this.count(result.usage)
      metrics.runs.inc({ outcome: result.stopped ? 'stopped' : 'finished' })
      await bus.append(req.sessionId, 'run_finished', { usage: result.usage, stopped: result.stopped })
      return { ...result, model: settings.model }
    } catch (err) {
      metrics.runs.inc({ outcome: 'failed' })
      await bus.append(req.sessionId, 'run_failed', { error: envelopeOf(err) }).catch(() => {})
      throw err
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
